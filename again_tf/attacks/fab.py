"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), and its targeted FAB-T.

FAB looks for the adversarial example of minimal norm: at each step it linearizes the
decision boundary between the true class and a chosen class at the current iterate,
projects both the iterate and the original image onto that hyperplane (inside the
[0, 1] box), and moves to a convex combination of the two projections, extrapolated.
As an ε-bounded attack (in AutoAttack), an example counts as fooled only when the
minimal-norm adversarial example found lies within ε.
"""

import math

import tensorflow as tf

from again_tf.attacks.apgd import SubsetAttack, draw_seed, fold, on_robust_subset
from again_tf.attacks.geometry import batch_norm, normalize, per_example

_BIG = 1e10


def _bisect(lower_is_feasible, lb, ub, steps):
    """`steps` rounds of the official integer bisection on per-row [lb, ub] indices."""
    for _ in range(steps):
        mid = tf.floor((lb + ub) / 2.0)
        go_up = lower_is_feasible(tf.cast(mid, tf.int32))
        lb = tf.where(go_up, mid, lb)
        ub = tf.where(go_up, ub, mid)
    return tf.cast(lb, tf.int32)


def _flat(t):
    """`(batch, D)` view of `t`, with D static when the image shape is."""
    size = math.prod(t.shape[1:]) if None not in t.shape[1:] else -1
    return tf.reshape(t, (tf.shape(t)[0], size))


def _at(t, idx):
    """`t[r, idx[r]]` for each row r."""
    return tf.gather(t, idx[:, None], axis=1, batch_dims=1)[:, 0]


def projection_linf(points, w, b):
    """Minimal-L∞ step d with wᵀ(t + d) = b and t + d ∈ [0, 1]^D, for each row.

    FAB's L∞ projection onto a hyperplane within the box (official
    `fab_projections.projection_linf`): the hyperplane is oriented so that the point lies
    on its positive side, coordinates are released in order of how far they can move
    (sorted breakpoints), and the radius λ is found by bisection over the sorted list.
    If the hyperplane cannot be reached inside the box, d moves every coordinate to the
    box corner that gets closest to it.

    Args:
        points: t, `(N, D)`.
        w: hyperplane normals, `(N, D)`.
        b: offsets, `(N,)`.

    Returns:
        d, `(N, D)`.
    """
    t = points
    dim = int(t.shape[1])
    sign = tf.where(tf.reduce_sum(w * t, 1) - b >= 0, 1.0, -1.0)
    w = w * sign[:, None]
    b = b * sign
    a = tf.cast(w < 0, t.dtype)
    nonzero = tf.cast(tf.not_equal(w, 0.0), t.dtype)
    d = (a - t) * nonzero
    p = a - t * (2.0 * a - 1.0)
    order = tf.argsort(p, axis=1)
    b = b - tf.reduce_sum(w * t, 1)
    b0 = tf.reduce_sum(w * d, 1)
    order_desc = tf.reverse(order, axis=[1])
    ws = tf.gather(w, order_desc, batch_dims=1)
    bs2 = -ws * tf.gather(d, order_desc, batch_dims=1)
    s = tf.cumsum(tf.abs(ws), axis=1)
    sb = tf.cumsum(bs2, axis=1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * _at(p, order[:, 0])
    c_l = b - b2 > 0
    c2 = tf.logical_and(b - b0 > 0, b - b2 <= 0)

    def feasible(mid):
        cur = _at(order, dim - 1 - mid)
        return b - (_at(sb, mid) - _at(s, mid) * _at(p, cur)) > 0

    n = tf.shape(t)[0]
    lb = _bisect(feasible, tf.zeros([n]), tf.fill([n], float(dim - 1)),
                 math.ceil(math.log2(dim)))
    lmbd_l = tf.maximum(tf.math.divide_no_nan(b - sb[:, -1], -s[:, -1]), 0.0)
    d_l = (2.0 * a - 1.0) * lmbd_l[:, None]
    lmbd = tf.maximum(tf.math.divide_no_nan(b - _at(sb, lb), -_at(s, lb)), 0.0)[:, None]
    d_c2 = tf.minimum(lmbd, d) * a + tf.maximum(-lmbd, d) * (1.0 - a)
    d = tf.where(c_l[:, None], d_l, tf.where(c2[:, None], d_c2, d))
    return d * nonzero


def projection_l2(points, w, b):
    """Minimal-L2 step d with wᵀ(t + d) = b and t + d ∈ [0, 1]^D, for each row.

    FAB's L2 projection (official `fab_projections.projection_l2`): the unconstrained
    projection is −α·w; coordinates that hit the box are clipped, in order of the
    breakpoints r_i where they do, and α is found by bisection over the sorted r.

    Args and returns as `projection_linf`.
    """
    t = points
    dim = int(t.shape[1])
    c = tf.reduce_sum(w * t, 1) - b
    flip = c < 0
    w = tf.where(flip[:, None], -w, w)
    c = tf.where(flip, -c, c)
    small = tf.abs(w) < 1e-8
    w_safe = tf.where(small, 1.0, w)
    r = tf.clip_by_value(tf.maximum(t / w_safe, (t - 1.0) / w_safe), -1e12, 1e12)
    r = tf.where(small, 1e12, r)
    r = tf.where(tf.equal(r, -1e12), 1e12, r)
    order = tf.argsort(r, axis=1)
    rs = tf.gather(r, order, batch_dims=1)
    rs2 = tf.concat([rs[:, 1:], tf.zeros_like(rs[:, :1])], axis=1)
    rs = tf.where(tf.equal(rs, 1e12), 0.0, rs)
    rs2 = tf.where(tf.equal(rs2, 1e12), 0.0, rs2)
    w3s = tf.gather(tf.square(w), order, batch_dims=1)
    w5 = tf.reduce_sum(w3s, 1, keepdims=True)
    ws = w5 - tf.cumsum(w3s, axis=1)
    d = -(r * w) * tf.cast(tf.logical_not(small), t.dtype)
    s = tf.concat([-w5 * rs[:, :1], tf.cumsum((rs - rs2) * ws, axis=1) - w5 * rs[:, :1]], 1)
    c4 = s[:, 0] + c < 0
    c3 = tf.reduce_sum(d * w, 1) + c > 0
    c2 = tf.logical_not(tf.logical_or(c4, c3))

    n = tf.shape(t)[0]
    lb = _bisect(lambda mid: _at(s, mid) + c > 0, tf.zeros([n]), tf.fill([n], float(dim - 1)),
                 math.ceil(math.log2(dim)))
    alpha4 = tf.math.divide_no_nan(c, w5[:, 0])
    d4 = -alpha4[:, None] * w
    ws_lb = _at(ws, lb)
    alpha2 = tf.where(tf.equal(ws_lb, 0.0), 0.0,
                      tf.math.divide_no_nan(_at(s, lb) + c, ws_lb) + _at(rs, lb))
    c5 = tf.cast(alpha2[:, None] > r, t.dtype)
    d2 = d * c5 - alpha2[:, None] * w * (1.0 - c5)
    d = tf.where(c4[:, None], d4, tf.where(c2[:, None], d2, d))
    return d * tf.cast(tf.logical_not(small), t.dtype)


PROJECTIONS = {"linf": projection_linf, "l2": projection_l2}


class FAB(SubsetAttack):
    """FAB (untargeted) and FAB-T (targeted) as in fra31/auto-attack's `FABAttack_PT`.

    Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive
    Boundary Attack", ICML 2020. Each iteration, at the current point x₁ (x₀ the clean
    image), with f_k = z_k − z_y and its input gradient g_k:

        k*  = argmin_k |f_k| / ‖g_k‖_q  (q the dual norm; FAB-T: k* = the target class)
        d₁, d₂ = Proj of x₁, x₀ onto {z : g_{k*}ᵀ(z − x₁) + f_{k*} = 0} ∩ [0, 1]^D
        α   = min(max(‖d₁‖ / (‖d₁‖ + ‖d₂‖), 0), α_max)
        x₁ ← clip((1 − α)(x₁ + η d₁) + α (x₀ + η d₂), 0, 1)

    and whenever x₁ is misclassified it is kept if it is the closest so far, and x₁ is
    pulled back towards x₀: x₁ ← x₀ + β (x₁ − x₀). An example counts as fooled if the
    closest adversarial example is within `eps`; then it is returned, otherwise the
    clean input.

    Args (beyond `Attack`'s model/eps/norm/seed/training):
        targeted: False for FAB (all classes' hyperplanes), True for FAB-T (one target
            class per run, the t-th most likely at the clean input, t = 2, 3, ...).
            Default True (AutoAttack standard runs FAB-T).
        n_iter: iterations per run. Default 100 (AutoAttack).
        n_restarts: runs per target (FAB: in total); runs after the first start from a
            random point at distance min(best, ε)/2. Default 1 (AutoAttack standard).
        n_target_classes: FAB-T's number of target classes. Default 9 (AutoAttack),
            capped at num_classes − 1.
        alpha_max: 0.1, eta: 1.05, beta: 0.9 (the official defaults).

    Example:
        x_adv = FAB(model, eps=8/255, targeted=True)(x, y)
    """

    def __init__(self, model, eps=8 / 255, norm="linf", targeted=True, n_iter=100,
                 n_restarts=1, n_target_classes=9, alpha_max=0.1, eta=1.05, beta=0.9,
                 seed=None, training=False):
        super().__init__(model, eps, norm=norm, seed=seed, training=training)
        for arg, value in (("n_iter", n_iter), ("n_restarts", n_restarts),
                           ("n_target_classes", n_target_classes)):
            if int(value) < 1:
                raise ValueError(f"Expected `{arg}` >= 1. Received: {arg}={value}")
        self.fab_targeted = bool(targeted)
        self.name = "fab-t" if self.fab_targeted else "fab"
        self.n_iter = int(n_iter)
        self.n_restarts = int(n_restarts)
        self.n_target_classes = int(n_target_classes)
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)

    def predict(self, x):
        return tf.argmax(self.logits(x), -1, output_type=tf.int32)

    def boundary(self, x1, y, target):
        """(f, g): logit differences `(B, K')` and their input gradients `(B, K', D)`.

        FAB-T: K' = 1, f = z_t − z_y. FAB: every class, with f_y = 1e10 so the true
        class is never chosen.
        """
        if target is not None:
            with tf.GradientTape() as tape:
                tape.watch(x1)
                z = self.logits(x1)
                diff = (tf.gather(z, target, axis=1, batch_dims=1)
                        - tf.gather(z, y, axis=1, batch_dims=1))
                total = tf.reduce_sum(diff)
            g = tape.gradient(total, x1)
            return diff[:, None], _flat(g)[:, None]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x1)
            z = self.logits(x1)
            sums = [tf.reduce_sum(z[:, k]) for k in range(int(z.shape[-1]))]
        jac = tf.stack([_flat(tape.gradient(v, x1)) for v in sums], 1)
        del tape
        onehot = tf.one_hot(y, tf.shape(z)[-1]) > 0.5
        f = z - tf.gather(z, y, axis=1, batch_dims=1)[:, None]
        g = jac - tf.gather(jac, y, axis=1, batch_dims=1)[:, None]
        return tf.where(onehot, _BIG, f), g

    def single_run(self, x0, y, target, seed, random_start):
        """One run on correctly classified `x0`; returns (closest adversarial, its norm).

        `random_start` is a boolean tensor (the official code starts its first run at x0).

        Examples for which no adversarial point was found get their clean input and the
        norm 1e10.
        """
        batch = tf.shape(x0)[0]
        flat0 = _flat(x0)
        # The official random start of the runs after the first: a point at distance
        # min(best so far in this run = 1e10, ε) / 2 from x0.
        if self.norm == "linf":
            t = tf.random.stateless_uniform(tf.shape(x0), seed, -1.0, 1.0)
        else:
            t = tf.random.stateless_normal(tf.shape(x0), seed)
        x1 = tf.where(random_start,
                      tf.clip_by_value(x0 + self.eps * normalize(t, self.norm) * 0.5, 0.0, 1.0),
                      x0)
        project = PROJECTIONS[self.norm]
        dual = (lambda v: tf.reduce_sum(tf.abs(v), -1)) if self.norm == "linf" else (
            lambda v: tf.sqrt(tf.reduce_sum(tf.square(v), -1)))

        def body(i, x1, adv, best):
            f, g = self.boundary(x1, y, target)
            dist = tf.abs(f) / (1e-12 + dual(g))
            k = tf.argmin(dist, axis=1, output_type=tf.int32)
            w = tf.gather(g, k, axis=1, batch_dims=1)
            flat1 = _flat(x1)
            b = -_at(f, k) + tf.reduce_sum(w * flat1, 1)
            d3 = project(tf.concat([flat1, flat0], 0), tf.concat([w, w], 0),
                         tf.concat([b, b], 0))
            d1 = tf.reshape(d3[:batch], tf.shape(x0))
            d2 = tf.reshape(d3[batch:], tf.shape(x0))
            a0 = tf.maximum(batch_norm(d3, self.norm), 1e-8)
            a1, a2 = a0[:batch], a0[batch:]
            alpha = per_example(tf.clip_by_value(a1 / (a1 + a2), 0.0, self.alpha_max), x0)
            x1 = tf.clip_by_value((x1 + self.eta * d1) * (1.0 - alpha)
                                  + (x0 + d2 * self.eta) * alpha, 0.0, 1.0)
            is_adv = tf.not_equal(self.predict(x1), y)
            dist_adv = batch_norm(x1 - x0, self.norm)
            better = tf.logical_and(is_adv, dist_adv < best)
            adv = tf.where(per_example(better, x0), x1, adv)
            best = tf.where(better, dist_adv, best)
            x1 = tf.where(per_example(is_adv, x0), x0 + (x1 - x0) * self.beta, x1)
            return i + 1, x1, adv, best

        _, _, adv, best = tf.while_loop(
            lambda i, *_: i < self.n_iter, body,
            (tf.constant(0), x1, x0, tf.fill([batch], _BIG)))
        return adv, best

    def _perturb(self, x, y, loss_fn):
        del loss_fn  # FAB follows the logits' decision boundaries, not a loss
        y = tf.cast(y, tf.int32)
        seed = draw_seed(self.seed_generator)
        logits = self.logits(x)
        num_classes = logits.shape[-1]
        robust = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y)
        targets = 1
        if self.fab_targeted:
            targets = self.n_target_classes
            if num_classes is not None:
                targets = min(targets, num_classes - 1)
        jobs = targets * self.n_restarts

        def body(job, robust, adv):
            restart = job % self.n_restarts

            def run(idx):
                xs, ys = tf.gather(x, idx), tf.gather(y, idx)
                target = None
                if self.fab_targeted:
                    order = tf.argsort(self.logits(xs), axis=-1)
                    rank = 2 + job // self.n_restarts
                    target = tf.gather(order, tf.shape(order)[-1] - rank, axis=1)
                adv_sub, _ = self.single_run(xs, ys, target, fold(seed, job), restart > 0)
                # Fooled: misclassified and within ε (FAB may return farther points).
                fooled = tf.logical_and(
                    tf.not_equal(self.predict(adv_sub), ys),
                    batch_norm(adv_sub - xs, self.norm) <= self.eps)
                return adv_sub, fooled

            robust, adv = on_robust_subset(robust, adv, run)
            return job + 1, robust, adv

        _, _, adv = tf.while_loop(lambda j, *_: j < jobs, body, (tf.constant(0), robust, x))
        return adv

    def __repr__(self):
        return (f"FAB(eps={self.eps:g}, norm={self.norm!r}, targeted={self.fab_targeted}, "
                f"n_iter={self.n_iter}, n_restarts={self.n_restarts})")
