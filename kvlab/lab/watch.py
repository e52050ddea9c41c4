"""Watch the cache: which keys and values each generation step computes, as a token x layer grid.

Every (layer, token) cell of the grid is one key vector and one value vector (all KV heads). At each
step of a generation:

- **no cache**: the forward runs over the whole sequence, so every cell of every layer is computed
  again, and nothing is kept afterwards: the whole grid lights up, then goes dark;
- **cache, step 0 (prefill)**: the prompt's columns are computed in one pass and stored;
- **cache, later steps (decode)**: one new column is computed; the rest is read from memory, which
  grows by one column (`bytes_per_cell` x layers) per step.

`record_frames` runs a real model with a spy wrapped around its cache and records what it computed;
`frames` says the same from the arithmetic alone (a test checks they agree). `watch_figure` draws
chosen steps side by side, `watch_animation` animates every step, `save_gif` writes it to figures/.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MODES = ("naive", "cached")
EMPTY, STORED, COMPUTED = 0, 1, 2
COLORS = ("#eeeeee", "#9ecae1", "#ff7f0e")  # empty, held in the cache, computed this step


@dataclass(frozen=True)
class Frame:
    mode: str              # "naive" or "cached"
    step: int              # 0 = the step that produces the first new token
    computed: np.ndarray   # bool [layers, max_tokens]: K/V computed in this step
    stored: np.ndarray     # bool [layers, max_tokens]: K/V held in memory after this step
    computed_total: int    # cells computed so far, this step included
    cache_bytes: int       # bytes held after this step (stored cells x bytes_per_cell)

    @property
    def grid(self) -> np.ndarray:
        """int [layers, max_tokens]: EMPTY, STORED or COMPUTED per cell (computed wins)."""
        g = np.where(self.stored, STORED, EMPTY)
        return np.where(self.computed, COMPUTED, g)


def _check(mode, num_layers, prompt_len, new_tokens, bytes_per_cell):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, val, low in (("num_layers", num_layers, 1), ("prompt_len", prompt_len, 1),
                           ("new_tokens", new_tokens, 1), ("bytes_per_cell", bytes_per_cell, 0)):
        if int(val) != val or val < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")


def _build(mode, computed_cols, num_layers, max_tokens, bytes_per_cell) -> list[Frame]:
    """computed_cols[t][layer] = token positions whose K/V step t computed in that layer."""
    out, total = [], 0
    stored = np.zeros((num_layers, max_tokens), dtype=bool)
    for t, per_layer in enumerate(computed_cols):
        comp = np.zeros((num_layers, max_tokens), dtype=bool)
        for layer, cols in enumerate(per_layer):
            comp[layer, list(cols)] = True
        total += int(comp.sum())
        if mode == "cached":
            stored = stored | comp
        out.append(Frame(mode, t, comp, stored.copy(), total, int(stored.sum()) * bytes_per_cell))
    return out


def frames(mode: str, num_layers: int, prompt_len: int, new_tokens: int,
           bytes_per_cell: int = 0) -> list[Frame]:
    """One `Frame` per generation step, from the arithmetic of generation (no model needed).

    The grid has prompt_len + new_tokens - 1 columns: the last new token is sampled, never run.
    """
    _check(mode, num_layers, prompt_len, new_tokens, bytes_per_cell)
    cols = []
    for t in range(new_tokens):
        n = prompt_len + t  # tokens in the sequence when step t runs
        run = range(n) if mode == "naive" or t == 0 else range(n - 1, n)
        cols.append([run] * num_layers)
    return _build(mode, cols, num_layers, prompt_len + new_tokens - 1, bytes_per_cell)


class _Spy:
    """Wraps a cache; records, per layer, the absolute positions whose k and v it was handed."""

    def __init__(self, inner, num_layers):
        self.inner, self.seen = inner, [[] for _ in range(num_layers)]

    @property
    def position_offset(self):
        return getattr(self.inner, "position_offset", 0)

    def attend(self, layer, q, k, v):
        start = int(self.position_offset)
        self.seen[layer].extend(range(start, start + k.shape[1]))
        return self.inner.attend(layer, q, k, v)

    def advance(self, num_tokens):
        self.inner.advance(num_tokens)


@torch.inference_mode()
def record_frames(model, prompt_ids, new_tokens: int, use_cache: bool,
                  bytes_per_cell: int | None = None) -> tuple[list[Frame], list[int]]:
    """Greedy generation on `model` with a spy on its cache -> (frames, new tokens).

    bytes_per_cell defaults to the model's: 2 (K and V) x kv_heads x head_dim x element size.
    """
    from kvlab.cache.base import NoCache
    from kvlab.cache.contiguous import ContiguousKVCache

    prompt = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    cfg = model.config
    if bytes_per_cell is None:
        bytes_per_cell = 2 * cfg.num_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size()
    mode = "cached" if use_cache else "naive"
    _check(mode, cfg.num_layers, len(prompt), new_tokens, bytes_per_cell)
    ids = torch.tensor([prompt], dtype=torch.long, device=model.device)
    kv = ContiguousKVCache.for_model(model, 1, len(prompt) + new_tokens) if use_cache else None
    cols, tokens, new_input = [], [], ids
    for _ in range(new_tokens):
        spy = _Spy(kv if use_cache else NoCache(), cfg.num_layers)
        logits = model(new_input if use_cache else ids, cache=spy, last_only=True)[:, -1]
        cols.append(spy.seen)
        nxt = logits.argmax(-1).view(1, 1)
        tokens.append(int(nxt))
        new_input = nxt
        ids = torch.cat([ids, nxt], dim=1)
    max_tokens = len(prompt) + new_tokens - 1
    return _build(mode, cols, cfg.num_layers, max_tokens, bytes_per_cell), tokens


def draw_grid(ax, frame: Frame, title: str | None = None):
    """Draw one frame's grid on `ax`: tokens across, layers up; returns the image."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(COLORS)
    im = ax.imshow(frame.grid, cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3),
                   origin="lower", aspect="auto", interpolation="nearest")
    L, T = frame.grid.shape
    ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    if title is not None:
        ax.set_title(title, fontsize=9)
    return im


def _legend(fig):
    from matplotlib.patches import Patch

    labels = ("not computed / not held", "held in the cache", "K, V computed this step")
    fig.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(COLORS, labels)],
               loc="lower center", ncol=3, fontsize=8, frameon=False)


def _label(f: Frame) -> str:
    what = ("prefill" if f.step == 0 else "decode") if f.mode == "cached" else "recompute all"
    name = {"naive": "no cache", "cached": "KV cache"}[f.mode]
    return (f"{name}, step {f.step} ({what}): {int(f.computed.sum())} cells, "
            f"cache {f.cache_bytes / 1024:.0f} KiB")


def watch_figure(naive: list[Frame], cached: list[Frame], steps=None):
    """Static figure: rows naive / cached, one column per chosen step, a last column with totals."""
    import matplotlib.pyplot as plt

    if len(naive) != len(cached) or not naive:
        raise ValueError(f"naive and cached must hold the same, non-zero number of frames, "
                         f"got {len(naive)} and {len(cached)}")
    steps = [0, 1, len(naive) - 1] if steps is None else list(steps)
    if any(not 0 <= s < len(naive) for s in steps):
        raise ValueError(f"steps must lie in [0, {len(naive)}), got {steps}")
    fig, axes = plt.subplots(2, len(steps) + 1, figsize=(3.0 * (len(steps) + 1), 5.2),
                             gridspec_kw={"width_ratios": [1] * len(steps) + [1.1]})
    for row, fr in enumerate((naive, cached)):
        for col, s in enumerate(steps):
            draw_grid(axes[row, col], fr[s], _label(fr[s]).replace(": ", ":\n", 1))
    x = np.arange(len(naive))
    ax = axes[0, -1]
    ax.plot(x, [f.computed_total for f in naive], color="#d62728", label="no cache")
    ax.plot(x, [f.computed_total for f in cached], color="#1f77b4", label="cache")
    ax.set(xlabel="step", ylabel="K/V cells computed so far", title="work")
    ax.legend(fontsize=8)
    ax = axes[1, -1]
    ax.plot(x, [f.cache_bytes / 1024 for f in naive], color="#d62728", label="no cache")
    ax.plot(x, [f.cache_bytes / 1024 for f in cached], color="#1f77b4", label="cache")
    ax.set(xlabel="step", ylabel="KiB held between steps", title="memory")
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _legend(fig)
    return fig


def watch_animation(naive: list[Frame], cached: list[Frame], interval_ms: int = 400):
    """(figure, FuncAnimation): both grids and the two totals, one animation frame per step."""
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation

    if len(naive) != len(cached) or not naive:
        raise ValueError("naive and cached must hold the same, non-zero number of frames")
    fig = plt.figure(figsize=(7.2, 5.0))
    gs = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
    ax_n, ax_c = fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[1, 0])
    ax_w, ax_m = fig.add_subplot(gs[0, 1]), fig.add_subplot(gs[1, 1])
    im_n = draw_grid(ax_n, naive[0], _label(naive[0]))
    im_c = draw_grid(ax_c, cached[0], _label(cached[0]))
    x = np.arange(len(naive))
    series = {}
    for ax, key, ylabel, scale in ((ax_w, "computed_total", "K/V cells computed so far", 1),
                                   (ax_m, "cache_bytes", "KiB held between steps", 1024)):
        for fr, color, name in ((naive, "#d62728", "no cache"), (cached, "#1f77b4", "cache")):
            ys = np.array([getattr(f, key) for f in fr]) / scale
            (line,) = ax.plot([], [], color=color, label=name)
            series[(key, name)] = (line, ys)
        top = max(max(ys.max() for _, ys in (v for k, v in series.items() if k[0] == key)), 1)
        ax.set(xlim=(0, max(len(x) - 1, 1)), ylim=(0, top * 1.05), xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _legend(fig)

    def update(i):
        im_n.set_data(naive[i].grid)
        im_c.set_data(cached[i].grid)
        ax_n.set_title(_label(naive[i]), fontsize=9)
        ax_c.set_title(_label(cached[i]), fontsize=9)
        for line, ys in series.values():
            line.set_data(x[:i + 1], ys[:i + 1])
        return [im_n, im_c] + [line for line, _ in series.values()]

    return fig, FuncAnimation(fig, update, frames=len(naive), interval=interval_ms, blit=False)


def save_gif(animation, name: str, fps: int = 3, dpi: int = 60):
    """Write `animation` to `<figures_dir>/<name>.gif` with Pillow; returns the path."""
    from matplotlib.animation import PillowWriter

    from kvlab.plots import _NAME, figures_dir

    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"save_gif: name={name!r} must be lowercase letters, digits, '_' or '-' "
                         "(like '03_watch_the_cache'), without a folder or an extension")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    out = figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.gif"
    animation.save(path, writer=PillowWriter(fps=fps), dpi=dpi)
    return path
