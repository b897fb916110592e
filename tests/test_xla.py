"""XLA: a compiled train step draws a fresh random start at every step, reproducibly."""

import keras
import numpy as np
import tensorflow as tf

from again_tf.defenses import AdversarialModel


def starts_of_two_steps(seed):
    """x_adv of two XLA train steps on the same batch with unchanged weights (lr 0)."""
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                            keras.layers.Flatten(), keras.layers.Dense(3)])
    adv = AdversarialModel(net, defense="pgd_at", eps=0.1, step_size=0.03, steps=1,
                           eval_steps=0, seed=seed)
    adv.build((None, 6, 6, 1))
    seen = tf.Variable(tf.zeros((8, 6, 6, 1)), trainable=False)
    make = adv.objective.adversarial_examples

    def recorded(*args):
        x_adv = make(*args)
        seen.assign(x_adv)
        return x_adv

    adv.objective.adversarial_examples = recorded
    adv.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=True)
    x = np.random.default_rng(0).uniform(size=(8, 6, 6, 1)).astype(np.float32)
    y = np.arange(8) % 3
    out = []
    for _ in range(2):
        adv.train_on_batch(x, y)
        out.append(seen.numpy().copy())
    return x, out


def test_xla_train_steps_draw_fresh_random_starts_reproducibly():
    x, (first, second) = starts_of_two_steps(seed=7)
    for x_adv in (first, second):
        assert np.abs(x_adv - x).max() <= 0.1 + 1e-6 and np.abs(x_adv - x).max() > 0.05
    assert np.abs(first - second).max() > 0.01  # a new start each step
    _, (again, _) = starts_of_two_steps(seed=7)
    np.testing.assert_array_equal(first, again)  # the same seed, the same starts
    _, (other, _) = starts_of_two_steps(seed=8)
    assert np.abs(first - other).max() > 0.01
