"""The Square attack (Andriushchenko et al., ECCV 2020): score-based black-box random search.

It queries only the model's logits, never a gradient: a random square of the image is
changed at each query and the change is kept if it lowers the margin loss.
"""

import math

import tensorflow as tf

from again_tf.attacks import losses
from again_tf.attacks.apgd import SubsetAttack, draw_seed, on_robust_subset
from again_tf.attacks.geometry import batch_norm, normalize, per_example

# Iterations after which p (the fraction of pixels changed per query) is halved; the
# official `p_selection` without rescaling, as AutoAttack runs it.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def fold(seed, *values):
    """A new stateless seed from `seed` and integers (restart, query index, salt), in order.

    Each value is hashed in with `tf.random.experimental.stateless_fold_in`, so different
    paths give unrelated seeds. (`apgd.fold` adds the values, which is commutative and
    linear: with it, query i's column seed equalled query i+1's row seed, and restart
    r+1's query i equalled restart r's query i+1.)
    """
    out = tf.cast(seed, tf.int32)
    for v in values:
        out = tf.random.experimental.stateless_fold_in(out, tf.cast(v, tf.int32))
    return out


def _eta_rectangle(rows, cols):
    """The official `eta_rectangles`: nested rectangles with weights Σ 1/(k+1)², unit L2.

    Cell (i, j) sums 1/(k+1)² over the rings k ≥ max(|i − ⌊rows/2⌋|, |j − ⌊cols/2⌋|),
    k < max(⌊rows/2⌋ + 1, ⌊cols/2⌋ + 1) — works with dynamic sizes.
    """
    rc, cc = rows // 2, cols // 2
    rings = tf.maximum(rc, cc) + 1
    di = tf.abs(tf.range(rows) - rc)[:, None]
    dj = tf.abs(tf.range(cols) - cc)[None, :]
    inner = tf.maximum(di, dj)
    k = tf.range(rings)
    weights = 1.0 / tf.square(tf.cast(k + 1, tf.float32))
    delta = tf.reduce_sum(tf.where(k[None, None, :] >= inner[:, :, None], weights, 0.0), -1)
    return delta / tf.sqrt(tf.reduce_sum(tf.square(delta)))


def eta(s, seed):
    """The official `eta(s)`: an s×s pattern, +rectangles on top, − below, unit L2 norm,
    transposed with probability 1/2."""
    top = _eta_rectangle(s // 2, s)
    bottom = -_eta_rectangle(s - s // 2, s)
    delta = tf.concat([top, bottom], axis=0)
    delta = delta / tf.sqrt(tf.reduce_sum(tf.square(delta)))
    flip = tf.random.stateless_uniform([], seed) > 0.5
    return tf.cond(flip, lambda: tf.transpose(delta), lambda: delta)


class Square(SubsetAttack):
    """Square attack, L∞ and L2, as in fra31/auto-attack's `SquareAttack` (untargeted).

    Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020. Minimizes the margin
    m(x) = z_y − max_{i≠y} z_i with random search: at query i a square of side
    s = max(round(√(p_i · H · W)), 1) (L2: ≥ 3 and odd) at a random position is set to
    ±2ε per channel (L2: filled with the `eta` pattern, rescaled with per-channel window
    norms as the official code does, `l2_update`, keeping ‖δ‖₂ = ε), projected,
    and kept when it lowers the loss or misclassifies. p_i starts at `p_init` and is
    halved at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (`P_SCHEDULE`).
    As in the official code, one square position and (L∞) one sign per channel are drawn
    per query for the whole batch. Only examples not yet misclassified are queried;
    the attack stops once all are. L∞ starts from vertical stripes of ±ε; L2 from a grid
    of `eta` patterns of side H/5. Every random draw (restart, query, which draw) gets its
    own seed from `fold`, so no two queries share their random numbers.

    Uses only forward passes (`self.logits`), never a gradient.

    Args (beyond `Attack`'s model/eps/norm/seed/training):
        n_queries: iterations (queries per example after the first). Default 5000
            (AutoAttack).
        p_init: initial fraction of pixels changed per query. Default 0.8 (AutoAttack).
        n_restarts: restarts on the points still robust. Default 1 (AutoAttack).

    Example:
        x_adv = Square(model, eps=8/255, n_queries=5000)(x, y)
    """

    name = "square"

    def __init__(self, model, eps=8 / 255, norm="linf", n_queries=5000, p_init=0.8,
                 n_restarts=1, seed=None, training=False):
        super().__init__(model, eps, norm=norm, seed=seed, training=training)
        if int(n_queries) < 1 or int(n_restarts) < 1:
            raise ValueError(f"Expected `n_queries` >= 1 and `n_restarts` >= 1. Received: "
                             f"n_queries={n_queries}, n_restarts={n_restarts}")
        if not 0.0 < float(p_init) <= 1.0:
            raise ValueError(f"Expected `p_init` in (0, 1]. Received: p_init={p_init}")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.n_restarts = int(n_restarts)

    def side_table(self, h, w, c):
        """Square sides for each stage of the p schedule (official rounding)."""
        del c
        sides = []
        for stage in range(len(P_SCHEDULE) + 1):
            p = self.p_init / 2 ** stage
            side = int(round(math.sqrt(p * h * w)))
            if self.norm == "linf":
                side = max(side, 1)
            else:
                side = max(side, 3)
                side += 1 - side % 2
            sides.append(min(side, h, w))
        return tf.constant(sides, tf.int32)

    def margin_and_loss(self, x, y):
        margin = losses.margin(self.logits(x), y)
        return margin, margin  # the "margin" loss of AutoAttack's Square

    def _position(self, h, s, seed):
        """The official `random_int(0, h − s)`: ⌊(h − s) · U⌋, in [0, h − s)."""
        u = tf.random.stateless_uniform([], seed)
        return tf.cast(tf.floor(tf.cast(h - s, tf.float32) * u), tf.int32)

    def _window(self, h, w, vh, vw, s):
        rows = tf.logical_and(tf.range(h) >= vh, tf.range(h) < vh + s)
        cols = tf.logical_and(tf.range(w) >= vw, tf.range(w) < vw + s)
        return tf.cast(tf.logical_and(rows[:, None], cols[None, :]), tf.float32)[None, :, :, None]

    def _init(self, x, seed):
        h, w, c = (int(d) for d in x.shape[1:])
        batch = tf.shape(x)[0]
        if self.norm == "linf":
            stripes = tf.sign(tf.random.stateless_uniform([batch, 1, w, c], seed, -1.0, 1.0))
            return tf.clip_by_value(x + self.eps * stripes, 0.0, 1.0)
        s = h // 5
        start = (h - s * 5) // 2
        delta = tf.zeros_like(x)
        count = 0
        for vh in range(start, start + s * (h // s), s):
            for vw in range(start, start + s * (w // s), s):
                if vh + s > h or vw + s > w:
                    continue
                pattern = eta(s, fold(seed, 1, count))[None, :, :, None]
                signs = tf.sign(tf.random.stateless_uniform([batch, 1, 1, c],
                                                            fold(seed, 2, count), -1.0, 1.0))
                window = tf.pad(pattern * signs, [[0, 0], [vh, h - vh - s], [vw, w - vw - s],
                                                  [0, 0]])
                delta += window
                count += 1
        return tf.clip_by_value(x + normalize(delta, "l2") * self.eps, 0.0, 1.0)

    def _propose_linf(self, x, x_best, s, seed):
        h, w, c = (int(d) for d in x.shape[1:])
        vh = self._position(h, s, fold(seed, 1))
        vw = self._position(w, s, fold(seed, 2))
        signs = tf.sign(tf.random.stateless_uniform([c], fold(seed, 3), -1.0, 1.0))
        new = self._window(h, w, vh, vw, s) * (2.0 * self.eps) * signs
        x_new = tf.clip_by_value(x_best + new, x - self.eps, x + self.eps)
        return tf.clip_by_value(x_new, 0.0, 1.0)

    def _propose_l2(self, x, x_best, s, seed):
        h, w, c = (int(d) for d in x.shape[1:])
        batch = tf.shape(x)[0]
        vh = self._position(h, s, fold(seed, 1))
        vw = self._position(w, s, fold(seed, 2))
        vh2 = self._position(h, s, fold(seed, 3))
        vw2 = self._position(w, s, fold(seed, 4))
        signs = tf.sign(tf.random.stateless_uniform([batch, 1, 1, c], fold(seed, 5), -1.0, 1.0))
        pattern = eta(s, fold(seed, 6))
        return self.l2_update(x, x_best, vh, vw, vh2, vw2, s, pattern, signs)

    def l2_update(self, x, x_best, vh, vw, vh2, vw2, s, pattern, signs):
        """The official L2 query once its random draws are made (NHWC; per channel k).

        With δ = x_best − x, W1 the s×s window at (vh, vw) and W2 the one at (vh2, vw2):

            new_k = pattern · sign_k + δ[W1]_k / ‖δ[W1]_k‖₂
            new_k ← new_k / ‖new_k‖₂ · √( max(ε² − ‖δ‖₂², 0) / C + ‖δ[W1 ∪ W2]_k‖₂² )
            δ[W2] ← 0,  δ[W1] ← new,  x_new = clip(x + ε · δ / ‖δ‖₂, 0, 1)

        Every window norm is per example and per channel (`sum(dim=(-2, -1))` in
        fra31/auto-attack's `square.py`); ‖δ‖₂ is over the whole image.
        """
        h, w = int(x.shape[1]), int(x.shape[2])
        delta = x_best - x
        mask1 = self._window(h, w, vh, vw, s)
        mask2 = self._window(h, w, vh2, vw2, s)
        window_1 = tf.slice(delta, [0, vh, vw, 0], [-1, s, s, -1])
        norms_window_1 = tf.sqrt(tf.reduce_sum(tf.square(window_1), [1, 2], keepdims=True))
        norms_image = per_example(batch_norm(delta, "l2"), x)
        union = delta * tf.maximum(mask1, mask2)
        norms_windows = tf.sqrt(tf.reduce_sum(tf.square(union), [1, 2], keepdims=True))
        new = tf.cast(pattern, tf.float32)[None, :, :, None] * signs
        new += window_1 / (1e-12 + norms_window_1)
        scale = tf.sqrt(tf.maximum(self.eps ** 2 - tf.square(norms_image), 0.0)
                        / float(x.shape[-1]) + tf.square(norms_windows))
        new = new / (1e-12 + tf.sqrt(tf.reduce_sum(tf.square(new), [1, 2], keepdims=True))) * scale
        placed = tf.pad(new, [[0, 0], [vh, h - vh - s], [vw, w - vw - s], [0, 0]])
        delta = tf.where(mask1 > 0, placed, tf.where(mask2 > 0, 0.0, delta))
        return tf.clip_by_value(x + normalize(delta, "l2") * self.eps, 0.0, 1.0)

    def single_run(self, x, y, seed):
        """One run of random search on `(x, y)`; returns the best points found."""
        h, w, c = (int(d) for d in x.shape[1:])
        sides = self.side_table(h, w, c)
        thresholds = tf.constant(P_SCHEDULE, tf.int32)
        x_best = self._init(x, fold(seed, 0))
        margin_min, loss_min = self.margin_and_loss(x_best, y)
        propose = self._propose_linf if self.norm == "linf" else self._propose_l2

        def body(i, x_best, margin_min, loss_min):
            idx = tf.cast(tf.where(margin_min > 0.0)[:, 0], tf.int32)[:, None]
            x_curr = tf.gather_nd(x, idx)
            x_best_curr = tf.gather_nd(x_best, idx)
            y_curr = tf.gather_nd(y, idx)
            margin_curr = tf.gather_nd(margin_min, idx)
            loss_curr = tf.gather_nd(loss_min, idx)
            stage = tf.reduce_sum(tf.cast(i > thresholds, tf.int32))
            x_new = propose(x_curr, x_best_curr, sides[stage], fold(seed, 10, i))
            margin, loss = self.margin_and_loss(x_new, y_curr)
            improved = loss < loss_curr
            loss_new = tf.where(improved, loss, loss_curr)
            improved = tf.logical_or(improved, margin <= 0.0)
            margin_new = tf.where(improved, margin, margin_curr)
            x_best_new = tf.where(per_example(improved, x_new), x_new, x_best_curr)
            return (i + 1, tf.tensor_scatter_nd_update(x_best, idx, x_best_new),
                    tf.tensor_scatter_nd_update(margin_min, idx, margin_new),
                    tf.tensor_scatter_nd_update(loss_min, idx, loss_new))

        _, x_best, margin_min, _ = tf.while_loop(
            lambda i, xb, m, l: tf.logical_and(i < self.n_queries, tf.reduce_any(m > 0.0)),
            body, (tf.constant(0), x_best, margin_min, loss_min))
        return x_best, margin_min > 0.0

    def _perturb(self, x, y, loss_fn):
        del loss_fn  # Square minimizes its margin loss on the logits, from queries only
        y = tf.cast(y, tf.int32)
        seed = draw_seed(self.seed_generator)
        robust = tf.equal(tf.argmax(self.logits(x), -1, output_type=tf.int32), y)
        adv = x
        for restart in range(self.n_restarts):
            def run(idx, restart=restart):
                xs, ys = tf.gather(x, idx), tf.gather(y, idx)
                adv_sub, _ = self.single_run(xs, ys, fold(seed, restart))
                fooled = tf.not_equal(
                    tf.argmax(self.logits(adv_sub), -1, output_type=tf.int32), ys)
                return adv_sub, fooled

            robust, adv = on_robust_subset(robust, adv, run)
        return adv

    def __repr__(self):
        return (f"Square(eps={self.eps:g}, norm={self.norm!r}, n_queries={self.n_queries}, "
                f"p_init={self.p_init:g})")
