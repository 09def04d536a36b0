"""Independent float64 NumPy references, written from the papers' formulas."""

import numpy as np


def _np(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def global_norm(tree):
    import jax

    return float(np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(_np(tree)))))


def clip_global(tree, max_norm):
    import jax

    n = global_norm(tree)
    s = max_norm / n if n > max_norm else 1.0
    return jax.tree.map(lambda x: x * s, _np(tree))


def clip_leaf(tree, bounds):
    import jax

    def one(x, b):
        n = np.sqrt(np.sum(x**2))
        return x * (b / n if n > b else 1.0)

    return jax.tree.map(one, _np(tree), bounds)


def clip_value(tree, lo, hi):
    import jax

    return jax.tree.map(lambda x: np.clip(x, lo, hi), _np(tree))


def agc(grads, params, clipping, eps, mask=None):
    """NFNets AGC: unit = slice along the last axis; vectors/scalars one unit."""
    import jax

    def one(g, p, m=True):
        if not m:
            return g
        axes = tuple(range(g.ndim)) if g.ndim <= 1 else tuple(range(g.ndim - 1))
        gn = np.sqrt(np.sum(g**2, axis=axes, keepdims=True))
        pn = np.sqrt(np.sum(p**2, axis=axes, keepdims=True))
        bound = clipping * np.maximum(pn, eps)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gn > bound, g * bound / gn, g)

    if mask is None:
        return jax.tree.map(one, _np(grads), _np(params))
    return jax.tree.map(one, _np(grads), _np(params), mask)
