"""
Drift from the base checkpoint, per layer: relative weight distance (geometric drift), linear
CKA of hidden states on held-out text (Kornblith et al., 2019; representation drift), and
functional forgetting = probe loss (tasks/probe.py) minus the base's. JSON and a PNG plot.
"""

from pathlib import Path

import torch

from tasks.probe import ProbeConfig, diffusion_probe


def layer_groups(backbone) -> dict[str, list[str]]:
    """Parameter names per layer, in order: "block i" for each transformer block, then
    "other" for the rest (embeddings, final norm, output head)."""
    owner = {id(p): f"block {i}" for i, block in enumerate(backbone.blocks) for p in block.parameters()}
    groups = {f"block {i}": [] for i in range(len(backbone.blocks))} | {"other": []}
    for name, p in backbone.model.named_parameters():
        groups[owner.get(id(p), "other")].append(name)
    return groups


@torch.no_grad()
def weight_drift(backbone, base) -> dict[str, float]:
    """Relative distance ||theta - theta_base|| / ||theta_base|| per layer group."""
    params, base_params = dict(backbone.model.named_parameters()), dict(base.model.named_parameters())
    drift = {}
    for group, names in layer_groups(backbone).items():
        missing = [n for n in names if n not in base_params or base_params[n].shape != params[n].shape]
        if missing:
            raise ValueError(f"the base checkpoint has no parameter {missing[0]} of matching shape: "
                             "drift needs the base the model was fine-tuned from")
        diff = sum((params[n].double() - base_params[n].double().to(params[n].device)).pow(2).sum() for n in names)
        norm = sum(base_params[n].double().pow(2).sum() for n in names)
        drift[group] = (diff.sqrt() / norm.sqrt().clamp_min(1e-12)).item()
    return drift


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of two representations of the same n examples,
    x (n, d1) and y (n, d2): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc centred.
    1 for identical representations; invariant to orthogonal maps and isotropic scaling."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300)).item()


@torch.no_grad()
def hidden_states(backbone, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Every layer's hidden states on clean text, tokens as rows: a list of (N * T, C)."""
    model, device = backbone.model.eval(), next(backbone.model.parameters()).device
    batches = [model(input_ids=windows[start:start + batch_size].to(device), output_hidden_states=True).hidden_states
               for start in range(0, len(windows), batch_size)]
    return [torch.cat([b[layer].flatten(0, 1).float().cpu() for b in batches]) for layer in range(len(batches[0]))]


def representation_drift(backbone, base, windows: torch.Tensor, max_tokens: int = 4096) -> list[float]:
    """Linear CKA of base vs fine-tuned hidden states per layer (index 0 = embeddings, i =
    output of block i; the last is after the final norm), on the first max_tokens tokens."""
    windows = windows[: max(1, max_tokens // windows.shape[1])]
    return [linear_cka(a, b) for a, b in zip(hidden_states(base, windows), hidden_states(backbone, windows))]


def drift_report(backbone, base, windows: torch.Tensor, probe: ProbeConfig) -> dict:
    """Geometric, representational and functional drift of a fine-tuned model from its base."""
    model_probe = diffusion_probe(backbone, windows, probe)["probe_loss"]
    base_probe = diffusion_probe(base, windows, probe)["probe_loss"]
    return {"weight_distance": weight_drift(backbone, base),
            "cka": representation_drift(backbone, base, windows),
            "probe_loss": model_probe, "base_probe_loss": base_probe,
            "forgetting": model_probe - base_probe}


def plot_drift(reports: dict[str, dict], path: Path, title: str = ""):
    """Per-block weight distance and CKA of each block's output, one line per run
    (name -> a drift_report, or anything with its "weight_distance" and "cka")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_w, ax_c) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, report in reports.items():
        blocks = [k for k in report["weight_distance"] if k != "other"]
        ax_w.plot(range(len(blocks)), [report["weight_distance"][b] for b in blocks], marker="o", label=name)
        ax_c.plot(range(len(report["cka"]) - 1), report["cka"][1:], marker="o", label=name)  # [0] = embeddings
    ax_w.set(xlabel="block", ylabel="||W - W_base|| / ||W_base||", title="geometric drift")
    ax_c.set(xlabel="block (its output)", ylabel="linear CKA with base", title="representation drift")
    for ax in (ax_w, ax_c):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
