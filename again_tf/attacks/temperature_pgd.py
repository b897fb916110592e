"""Temperature-PGD (Tian et al., KDD 2021): PGD on a temperature-scaled cross-entropy."""

import functools

from again_tf.attacks import losses
from again_tf.attacks.pgd import PGD

# Our choice, not a number from the paper (its full text was not available to us). On a
# PGD-trained small CNN (Fashion-MNIST, ε = 0.1, 300 test images, 20 steps) robust accuracy
# was 61.3 % at T = 0.5, 62.7 % with plain PGD (T = 1) and 65-68 % at T = 2-10: sharpening
# the confidence distribution (T < 1) is the stronger direction. Pass `temperature`
# (evaluate.py: --temperature) to use another value.
DEFAULT_TEMPERATURE = 0.5


class TemperaturePGD(PGD):
    """PGD on the cross-entropy of the temperature-scaled confidence, softmax(z / T).

    Tian, Kuang, Jiang, Wu & Wang, "Analysis and Applications of Class-wise Robustness
    in Adversarial Training", KDD 2021 (arXiv:2105.14240). Each step maximizes

        L_T(x, y) = −log softmax(z(x) / T)_y         (`losses.temperature_cross_entropy`)

    with the usual PGD step and projection (`PGD`). Rescaling the logits by 1/T changes
    how the gradient ∂L_T/∂z = (p_T − onehot(y))/T weighs the classes (p_T =
    softmax(z/T)): T < 1 sharpens the distribution towards the most likely wrong
    classes (the C&W margin is the T → 0 limit), T > 1 spreads it over all classes;
    T = 1 is plain PGD.

    Args (beyond `PGD`'s; `loss` is fixed):
        temperature: T > 0. Default `DEFAULT_TEMPERATURE` = 0.5 — our choice, not the
            paper's (its text was not available to us; see the constant's comment); set
            it explicitly to reproduce the paper.

    Example:
        x_adv = TemperaturePGD(model, eps=8/255, step_size=2/255, steps=20, temperature=0.5)(x, y)
    """

    def __init__(self, model, eps=8 / 255, step_size=2 / 255, steps=10,
                 temperature=DEFAULT_TEMPERATURE, **kwargs):
        if float(temperature) <= 0:
            raise ValueError(f"Expected `temperature` > 0. Received: temperature={temperature}")
        if "loss" in kwargs:
            raise ValueError("TemperaturePGD fixes its loss (temperature-scaled "
                             f"cross-entropy). Received: loss={kwargs['loss']!r}")
        self.temperature = float(temperature)
        loss = functools.partial(losses.temperature_cross_entropy, temperature=self.temperature)
        super().__init__(model, eps, step_size=step_size, steps=steps, loss=loss, **kwargs)

    def __repr__(self):
        return (f"TemperaturePGD(eps={self.eps:g}, step_size={self.step_size:g}, "
                f"steps={self.steps}, temperature={self.temperature:g}, norm={self.norm!r})")
