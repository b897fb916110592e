"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

Also holds what the AutoAttack components (apgd.py, fab.py, square.py) share besides the
geometry (`geometry.py`): stateless seeds, and running an attack on the subset of a batch
still robust.
"""

import keras
import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.base import NORMS, Attack
from again_tf.attacks.geometry import normalize, per_example, project_ball


# ----------------------------------------------------------------------------- helpers
def draw_seed(seed_generator):
    """One `[2]` int32 seed for the stateless random ops of one `perturb` call.

    Drawn once per call from the attack's `SeedGenerator` (fresh in every call, also in a
    compiled function); loops then derive their seeds from it with `fold`, so no
    stateful random op runs inside a `tf.while_loop`.
    """
    return tf.cast(keras.random.randint((2,), 0, 2 ** 30, seed=seed_generator, dtype="int32"),
                   tf.int32)


def fold(seed, *values):
    """A new stateless seed from `seed` and integers (loop counters, salts)."""
    out = seed
    for v in values:
        out = out + tf.stack([tf.cast(v, tf.int32) * 7919 + 1, tf.cast(v, tf.int32) + 104729])
    return out


def predict(model_logits, x):
    return tf.argmax(model_logits(x), axis=-1, output_type=tf.int32)


def on_robust_subset(robust, adv, run):
    """Runs `run(indices)` on the still-robust examples and merges what it fooled.

    `robust` (batch,) bool and `adv` (batch, ...) are the current state; `run(idx)` gets
    the indices of the robust examples and returns `(adv_subset, fooled_subset)`.
    Returns the new `(robust, adv)`; examples not fooled keep their previous `adv`.
    This is how every AutoAttack component attacks only the points still robust.
    """
    idx = tf.cast(tf.where(robust)[:, 0], tf.int32)

    def attack():
        adv_sub, fooled = run(idx)
        return merge_fooled(robust, adv, idx, adv_sub, fooled)

    return tf.cond(tf.size(idx) > 0, attack, lambda: (robust, adv))


def merge_fooled(robust, adv, idx, adv_sub, fooled):
    """Writes the fooled points of the subset `idx` back: their `adv_sub`, robust False."""
    hit = tf.boolean_mask(idx, fooled)[:, None]
    new_adv = tf.tensor_scatter_nd_update(adv, hit, tf.boolean_mask(adv_sub, fooled))
    new_robust = tf.tensor_scatter_nd_update(robust, hit, tf.zeros(tf.shape(hit)[:1], tf.bool))
    return new_robust, new_adv


class SubsetAttack(Attack):
    """An `Attack` compiled once for any batch size (the AutoAttack components).

    Its compiled call (as every `Attack`'s) has a `None` batch dimension, so batches of
    any size (the robust points left by an earlier attack, the last partial batch) reuse
    one trace. The attacks work on dynamically sized subsets, so they are not
    XLA-compiled.
    """

    _autograph = False

    def __init__(self, model, eps, norm="linf", seed=None, training=False, **kwargs):
        if norm not in NORMS:
            raise ValueError(f"Unknown norm {norm!r}. Expected one of: {', '.join(NORMS)}")
        super().__init__(model, eps, norm=norm, seed=seed, training=training, **kwargs)

    def logits(self, x):
        return tf.cast(super().logits(x), tf.float32)


# ----------------------------------------------------------------------------- APGD
class APGD(SubsetAttack):
    """Auto-PGD: PGD with momentum and a step size halved at adaptive checkpoints.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020; follows fra31/auto-attack's
    `APGDAttack`. Each iteration (η the per-example step, α = 0.75, 1.0 at the first):

        z      = P(x_k + η · sign(∇L(x_k)))            (L2: η · ∇/‖∇‖₂)
        x_{k+1} = P(x_k + α (z − x_k) + (1 − α)(x_k − x_{k−1}))

    with P the projection onto the ε-ball ∩ [0, 1]. η starts at 2ε. At the checkpoints
    w_j = ⌈p_j · N_iter⌉, p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
    0.06) (in the code: a countdown k that starts at ⌊0.22 N⌋ and shrinks by ⌊0.03 N⌋
    to at least ⌊0.06 N⌋), η is halved for an example, and it restarts from its best
    point, when (1) the loss increased in at most ρ = 75 % of the steps since the last
    checkpoint, or (2) η was not halved at the last checkpoint and the best loss has
    not improved since. Returns, for each example, a misclassified iterate if one was
    found (else the clean input). Restarts run only on the points still robust.

    Args (beyond `Attack`'s model/eps/norm/seed/training):
        loss: "ce" (APGD-CE) or "dlr" (APGD-DLR, `losses.dlr`), or a callable
            `(logits, labels) -> (batch,)`. Default "ce".
        n_iter: iterations per restart. Default 100 (AutoAttack).
        n_restarts: random restarts. Default 1 (AutoAttack standard; 5 in "plus").
        rho: ρ of condition (1). Default 0.75 (official code).
        eot_iter: gradients averaged over this many forward passes (Expectation over
            Transformation, for randomized defenses). Default 1; AutoAttack "rand": 20.

    Zero-gradient check (official `checks.check_zero_gradients`, run by the official code
    for the DLR losses only): with loss "dlr" or the targeted DLR of APGD-T, every run
    looks at the gradient at its random start, and a point where Σ|∇| = 0 in at least
    one run is counted once in the variable `zero_gradient_points` (it accumulates over
    calls; `AutoAttack` resets it per component and turns it into a warning). Such points
    give the gradient steps nothing to follow, so their robustness may be overstated.

    Example:
        x_adv = APGD(model, eps=8/255, loss="ce")(x, y)
    """

    ZERO_GRADIENT_LOSSES = ("dlr", "dlr-targeted")

    name = "apgd-ce"

    def __init__(self, model, eps=8 / 255, norm="linf", loss="ce", n_iter=100, n_restarts=1,
                 rho=0.75, eot_iter=1, seed=None, training=False):
        super().__init__(model, eps, norm=norm, seed=seed, training=training)
        for arg, value in (("n_iter", n_iter), ("n_restarts", n_restarts),
                           ("eot_iter", eot_iter)):
            if int(value) < 1:
                raise ValueError(f"Expected `{arg}` >= 1. Received: {arg}={value}")
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.loss = losses.get(loss)
        self.n_iter = int(n_iter)
        self.n_restarts = int(n_restarts)
        self.rho = float(rho)
        self.eot_iter = int(eot_iter)
        # The official checkpoint schedule, as counts of iterations.
        self.n_iter_2 = max(int(0.22 * self.n_iter), 1)
        self.n_iter_min = max(int(0.06 * self.n_iter), 1)
        self.size_decr = max(int(0.03 * self.n_iter), 1)
        self.zero_gradient_points = tf.Variable(0, dtype=tf.int64, trainable=False,
                                                name="zero_gradient_points")

    @property
    def checks_zero_gradients(self):
        """True for the losses the official code checks for zero gradients (DLR, APGD-T)."""
        return self.loss_name in self.ZERO_GRADIENT_LOSSES

    # The loss of one example set; APGD-T overrides it with the targeted DLR loss.
    def objective(self, logits, y, target):
        del target
        return self.loss(logits, y)

    def loss_and_grad(self, x_adv, y, target, loss_fn):
        """(logits, per-example loss, ∇ₓ Σ loss), averaged over `eot_iter` passes."""

        def once():
            seen = {}

            def loss_only(xa, ya):  # keeps the logits of the same forward pass
                if loss_fn is not None:
                    return tf.cast(loss_fn(xa, ya), tf.float32)
                seen["logits"] = self.logits(xa)
                return self.objective(seen["logits"], ya, target)

            grad, loss = self.input_gradient(x_adv, y, loss_only)  # float16-safe
            logits = seen.get("logits")
            if logits is None:
                logits = self.logits(x_adv)
            loss = tf.cast(loss, tf.float32)
            return tf.stop_gradient(logits), tf.stop_gradient(loss), grad

        if self.eot_iter == 1:
            return once()
        logits, loss, grad = once()

        def body(i, logits, loss, grad):
            new_logits, new_loss, new_grad = once()
            return i + 1, new_logits, new_loss, grad + new_grad

        _, logits, loss, grad = tf.while_loop(
            lambda i, *_: i < self.eot_iter, body, (tf.constant(1), logits, loss, grad))
        return logits, loss, grad / float(self.eot_iter)

    def start(self, x, seed):
        """The official random start: a point on the ε-sphere's surface, clipped."""
        shape = tf.shape(x)
        if self.norm == "linf":
            t = tf.random.stateless_uniform(shape, seed, -1.0, 1.0)
        else:
            t = tf.random.stateless_normal(shape, seed)
        return tf.clip_by_value(x + self.eps * normalize(t, self.norm), 0.0, 1.0)

    def step(self, x_adv, x_old, grad, step_size, x, first):
        """The momentum step of APGD, before its gradient evaluation."""
        a = tf.where(first, 1.0, 0.75)
        momentum = x_adv - x_old
        if self.norm == "linf":
            z = project_ball(x_adv + step_size * tf.sign(grad), x, self.eps, "linf")
        else:
            z = project_ball(x_adv + step_size * normalize(grad, "l2"), x, self.eps, "l2")
        return project_ball(x_adv + (z - x_adv) * a + momentum * (1.0 - a), x, self.eps,
                            self.norm)

    def single_run(self, x, y, target, loss_fn, seed):
        """One restart on `(x, y)`; returns (adversarial-or-start points, still correct,
        zero gradient at the random start)."""
        n = self.n_iter
        x_adv = self.start(x, seed)
        logits, loss, grad = self.loss_and_grad(x_adv, y, target, loss_fn)
        zero_grad = tf.equal(tf.reduce_sum(tf.abs(tf.reshape(grad, [tf.shape(grad)[0], -1])),
                                           1), 0.0)
        acc = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)
        step_size = tf.fill(tf.shape(y), 2.0 * self.eps)
        batch = tf.shape(y)[0]
        state = dict(
            i=tf.constant(0), x_adv=x_adv, x_old=x_adv, grad=grad, x_best=x_adv,
            grad_best=grad, loss_best=loss, x_best_adv=x_adv, acc=acc, step=step_size,
            loss_steps=tf.zeros([n, batch]), counter=tf.constant(0),
            k=tf.constant(self.n_iter_2), loss_best_last=loss,
            reduced_last=tf.ones([batch], tf.bool))

        def body(s):
            i = s["i"]
            x_new = self.step(s["x_adv"], s["x_old"], s["grad"], per_example(s["step"], x),
                              x, tf.equal(i, 0))
            logits, loss, grad = self.loss_and_grad(x_new, y, target, loss_fn)
            pred_ok = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)
            acc = tf.logical_and(s["acc"], pred_ok)
            x_best_adv = tf.where(per_example(pred_ok, x), s["x_best_adv"], x_new)
            loss_steps = tf.tensor_scatter_nd_update(s["loss_steps"], [[i]], loss[None])
            improved = loss > s["loss_best"]
            x_best = tf.where(per_example(improved, x), x_new, s["x_best"])
            grad_best = tf.where(per_example(improved, x), grad, s["grad_best"])
            loss_best = tf.where(improved, loss, s["loss_best"])
            counter = s["counter"] + 1
            k = s["k"]
            check = tf.equal(counter, k)
            # Condition (1): the loss increased in at most ρ·k of the last k steps. Index
            # i − j − 1 = −1 wraps to the (still zero) last row, as in the official code.
            hi = i - tf.range(k)
            ups = tf.gather(loss_steps, tf.math.floormod(hi, n)) > tf.gather(
                loss_steps, tf.math.floormod(hi - 1, n))
            oscillating = (tf.reduce_sum(tf.cast(ups, tf.float32), 0)
                           <= tf.cast(k, tf.float32) * self.rho)
            # Condition (2): not reduced last time and no improvement since.
            stalled = tf.logical_and(tf.logical_not(s["reduced_last"]),
                                     s["loss_best_last"] >= loss_best)
            reduce = tf.logical_and(check, tf.logical_or(oscillating, stalled))
            step = tf.where(reduce, s["step"] / 2.0, s["step"])
            x_adv = tf.where(per_example(reduce, x), x_best, x_new)
            grad = tf.where(per_example(reduce, x), grad_best, grad)
            reduced_last = tf.where(check, reduce, s["reduced_last"])
            loss_best_last = tf.where(check, loss_best, s["loss_best_last"])
            k = tf.where(check, tf.maximum(k - self.size_decr, self.n_iter_min), k)
            counter = tf.where(check, 0, counter)
            return [dict(i=i + 1, x_adv=x_adv, x_old=s["x_adv"], grad=grad, x_best=x_best,
                         grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv,
                         acc=acc, step=step, loss_steps=loss_steps, counter=counter, k=k,
                         loss_best_last=loss_best_last, reduced_last=reduced_last)]

        (state,) = tf.while_loop(lambda s: s["i"] < n, body, [state])
        return state["x_best_adv"], state["acc"], zero_grad

    def jobs(self, num_classes):
        """Number of (restart, target) runs; each runs on the points still robust."""
        return self.n_restarts

    def job_target(self, job, x):
        """The target classes of run `job` on the clean points `x` (None: untargeted)."""
        del job, x
        return None

    def _perturb(self, x, y, loss_fn):
        y = tf.cast(y, tf.int32)
        if loss_fn == self.default_loss:  # bound methods compare equal, never identical
            loss_fn = None
        seed = draw_seed(self.seed_generator)
        logits = self.logits(x)
        robust = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)

        def body(job, robust, adv, zero):
            idx = tf.cast(tf.where(robust)[:, 0], tf.int32)  # only the points still robust

            def attack():
                xs, ys = tf.gather(x, idx), tf.gather(y, idx)
                target = self.job_target(job, xs)
                adv_sub, acc_sub, zero_sub = self.single_run(xs, ys, target, loss_fn,
                                                             fold(seed, job))
                new_robust, new_adv = merge_fooled(robust, adv, idx, adv_sub,
                                                   tf.logical_not(acc_sub))
                new_zero = tf.tensor_scatter_nd_update(
                    zero, idx[:, None], tf.logical_or(tf.gather(zero, idx), zero_sub))
                return new_robust, new_adv, new_zero

            robust, adv, zero = tf.cond(tf.size(idx) > 0, attack,
                                        lambda: (robust, adv, zero))
            return job + 1, robust, adv, zero

        _, _, adv, zero = tf.while_loop(
            lambda j, *_: j < self.jobs(logits.shape[-1]), body,
            (tf.constant(0), robust, x, tf.zeros_like(robust)))
        if self.checks_zero_gradients:
            counted = self.zero_gradient_points.assign_add(
                tf.reduce_sum(tf.cast(zero, tf.int64)))
            with tf.control_dependencies([counted]):
                adv = tf.identity(adv)
        return adv

    def __repr__(self):
        return (f"{type(self).__name__}(eps={self.eps:g}, norm={self.norm!r}, "
                f"loss={self.loss_name!r}, n_iter={self.n_iter}, n_restarts={self.n_restarts}"
                + (f", eot_iter={self.eot_iter}" if self.eot_iter > 1 else "") + ")")


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, once per target class (Croce & Hein 2020).

    For the t-th run (t = 2 … n_target_classes + 1) the target of each still-robust
    example is the class with the t-th largest logit at its clean input, and the loss
    `losses.targeted_dlr`, −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2 + 1e-12), is maximized.

    Args (beyond `APGD`'s, whose `loss` it fixes):
        n_target_classes: number of target classes. Default 9 (AutoAttack standard,
            L∞ and L2); capped at num_classes − 1. Needs at least 4 classes.
        n_restarts: restarts per target class. Default 1 (AutoAttack).

    Example:
        x_adv = APGDT(model, eps=8/255)(x, y)
    """

    name = "apgd-t"

    def __init__(self, model, eps=8 / 255, norm="linf", n_iter=100, n_restarts=1,
                 n_target_classes=9, rho=0.75, eot_iter=1, seed=None, training=False):
        super().__init__(model, eps, norm=norm, loss="ce", n_iter=n_iter,
                         n_restarts=n_restarts, rho=rho, eot_iter=eot_iter, seed=seed,
                         training=training)
        if int(n_target_classes) < 1:
            raise ValueError(f"Expected `n_target_classes` >= 1. "
                             f"Received: n_target_classes={n_target_classes}")
        self.loss_name = "dlr-targeted"
        self.n_target_classes = int(n_target_classes)

    def objective(self, logits, y, target):
        return losses.targeted_dlr(logits, y, target)

    def jobs(self, num_classes):
        if num_classes is not None and num_classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes; the "
                             f"model has {num_classes}")
        targets = self.n_target_classes
        if num_classes is not None:
            targets = min(targets, num_classes - 1)
        return targets * self.n_restarts

    def job_target(self, job, x):
        logits = self.logits(x)
        rank = 2 + job // self.n_restarts  # t-th largest logit, t = 2, 3, ...
        order = tf.argsort(logits, axis=-1, direction="ASCENDING")
        return tf.gather(order, tf.shape(logits)[-1] - rank, axis=1)

    def __repr__(self):
        return (f"APGDT(eps={self.eps:g}, norm={self.norm!r}, n_iter={self.n_iter}, "
                f"n_target_classes={self.n_target_classes}, n_restarts={self.n_restarts})")
