"""`medir-fast train`: the official all-in-one objective on paired folders.

Every batch mixes the tasks (in turn, or in the shares `--mix` gives), loss = L1 (or `--loss
log-l1`, see `crop_loss`) + 0.001 x the routing load-balancing loss, Adam 2e-4 with a cosine
schedule, random crops, flips and 90-degree rotations. Checkpoints (model, optimizer, schedule,
step, RNG) are written atomically, so a run killed at any moment resumes from its last
checkpoint with `--resume`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..model import AMIR, DEFAULT_CONFIG, CheckpointError, build_model, deepen, infer_config
from ..model.checkpoint import DEPTH
from ..outputs import write_atomically
from ..tasks import MODALITIES, get_task, per_modality
from .paired import BODY_CT_NOTE, BODY_CT_QUIET_STRIDE, CT_DOSE_RANGE, QUIET_BODY_CT_NOTE, PairedVolume, fresh_pairs, read_pairs

CONFIGS = {  # "slim" is the shipped default: a 512 x 512 slice in seconds on a 2-core CPU
    "slim": dict(DEFAULT_CONFIG, dim=16, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1),
    "compact": dict(DEFAULT_CONFIG, dim=16, num_blocks=[2, 2, 2, 2], num_refinement_blocks=2),
    "small": dict(DEFAULT_CONFIG, dim=24, num_blocks=[2, 3, 3, 4], num_refinement_blocks=2),
    "default": dict(DEFAULT_CONFIG),
}
LOAD_BALANCING_WEIGHT = 0.001
LOSSES = ("l1", "log-l1")


def crop_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The loss of one task's crops [n,1,c,c].

    `l1`: the mean absolute error, so a crop counts by its absolute error and a noisy crop
    outweighs a quiet one. `log-l1`: each crop's L1 weighted by the inverse of its own (weights
    held constant and scaled to a mean of 1), which is the gradient of the mean log L1 up to
    one factor per batch: a crop counts by its relative error, as mean per-slice PSNR counts
    slices, and the task's weight in the batch stays what L1 gives it.
    """
    per_crop = (out - target).abs().flatten(1).mean(1)
    if kind == "l1":
        return per_crop.mean()
    if kind != "log-l1":
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    weight = 1 / (per_crop.detach() + 1e-6)
    return (weight / weight.mean() * per_crop).mean()


def resolve_config(spec: str) -> dict:
    """A preset name, a JSON file, or inline JSON (keys override the slim preset)."""
    if spec in CONFIGS:
        return dict(CONFIGS[spec])
    text = Path(spec).read_text() if spec.endswith(".json") and Path(spec).is_file() else spec
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)}, a .json file or inline JSON; got {spec!r}") from None
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown AMIR config keys: {', '.join(sorted(unknown))}")
    return dict(CONFIGS["slim"], **overrides)


# --------------------------------------------------------------------------- batches


def _pad_to(stack: np.ndarray, size: int) -> np.ndarray:
    """Mirror-pad (slices, H, W) so both sides are at least `size`: a large crop still fits a small slice."""
    short = [max(size - n, 0) for n in stack.shape[1:]]
    pad = [(0, 0)] + [(k // 2, k - k // 2) for k in short]
    return np.pad(stack, pad, mode="reflect") if any(p != (0, 0) for p in pad) else stack


class PatchSampler:
    """Random paired crops in network units ([0, 1] per task preset), tasks interleaved.

    `crop` is one side for all tasks or one per modality: super-resolution gains from context
    (large crops), denoising from many small ones. Slices smaller than the crop are
    mirror-padded (input and target alike), so crops may come near the full slice size, as in
    Restormer's progressive learning.
    """

    def __init__(self, pairs: list[PairedVolume], crop: int | dict[str, int], rng: np.random.Generator,
                 mix: dict[str, int] | None = None):
        self.rng = rng
        self.slices: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for pair in pairs:
            task = get_task(pair.modality)
            size = crop if isinstance(crop, int) else crop[pair.modality]
            lq, hq = (_pad_to(task.normalize(x).astype(np.float32), size) for x in (pair.lq, pair.hq))
            self.slices.setdefault(pair.modality, []).extend(zip(lq, hq))
        self.modalities = sorted(self.slices)
        self.crops = {m: crop if isinstance(crop, int) else crop[m] for m in self.modalities}
        # batch slots cycle through this list from a random start: each modality in turn, or `mix[m]` times
        self.turns = [m for m in self.modalities for _ in range(mix[m] if mix else 1)]

    def _crop(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        stack, c = self.slices[modality], self.crops[modality]
        for _ in range(10):  # prefer crops with anatomy in them over pure background
            lq, hq = stack[self.rng.integers(len(stack))]
            r, s = self.rng.integers(hq.shape[0] - c + 1), self.rng.integers(hq.shape[1] - c + 1)
            lq, hq = lq[r:r + c, s:s + c], hq[r:r + c, s:s + c]
            if hq.max() - hq.min() > 0.02:
                break
        k = self.rng.integers(4)
        lq, hq = np.rot90(lq, k), np.rot90(hq, k)
        if self.rng.random() < 0.5:
            lq, hq = lq[:, ::-1], hq[:, ::-1]
        return lq, hq

    def batch(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`size` crops as (input, target) tensors [n,1,c,c], one pair per task (its crop size c)."""
        start = self.rng.integers(len(self.turns))
        groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for i in range(size):
            modality = self.turns[(start + i) % len(self.turns)]
            groups.setdefault(modality, []).append(self._crop(modality))
        stack = lambda crops, j: torch.from_numpy(np.stack([c[j] for c in crops]).copy())[:, None]
        return [(stack(crops, 0), stack(crops, 1)) for crops in groups.values()]


class FreshPairStream:
    """Pools of protocol-v1 pairs degraded afresh (`paired.fresh_pairs`), one ready ahead of use.

    The next pool is simulated in a background thread while the current one trains, so a GPU
    run does not wait for the CT projector; each pool's seed comes from the run's generator.
    """

    def __init__(self, slices: int, rng: np.random.Generator, modalities: tuple[str, ...], device: str,
                 ct_dose: tuple[float, float], body_ct: bool = False, quiet_body_ct: float = 0.0):
        self.slices, self.rng, self.modalities, self.device, self.ct_dose = slices, rng, modalities, device, ct_dose
        self.body_ct, self.quiet_body_ct = body_ct, quiet_body_ct
        self.cancelled = threading.Event()
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.pending = self._submit()

    def _submit(self) -> Future:
        seed = int(self.rng.integers(2**63))
        return self.worker.submit(fresh_pairs, self.slices, np.random.default_rng(seed), self.modalities, self.device,
                                  ct_dose=self.ct_dose, body_ct=self.body_ct,
                                  quiet_body_ct=self.quiet_body_ct, cancelled=self.cancelled)

    def next(self) -> list[PairedVolume]:
        pairs = self.pending.result()
        self.pending = self._submit()
        return pairs

    def close(self) -> None:
        """Stop the pool being simulated at its next source (`fresh_pairs`) instead of finishing it."""
        self.cancelled.set()
        self.worker.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- checkpoints


def save_atomic(obj, path: Path) -> None:
    """torch.save, whole or not at all (`outputs.write_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: torch.save(obj, tmp), "checkpoint")


def _rng_state(rng: np.random.Generator) -> dict:
    state = rng.bit_generator.state
    return {"torch": torch.get_rng_state(), "numpy": json.dumps(state)}


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    rng.bit_generator.state = json.loads(state["numpy"])


# --------------------------------------------------------------------------- the loop


def cosine_lr(lr: float, progress: float) -> float:
    """Cosine decay from `lr` to lr/100 as `progress` goes from 0 to 1."""
    floor = lr * 0.01
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def train(
    data_root: str | Path | None,
    out_dir: str | Path,
    config: dict,
    steps: int | None = None,
    batch_size: int = 6,
    crop: int | dict[str, int] = 64,
    lr: float = 2e-4,
    device: str = "cpu",
    seed: int = 0,
    init: str | None = None,
    resume: bool = False,
    save_every: int = 100,
    time_budget: float | None = None,
    stop_after: int | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    progress: bool = True,
    simulate: bool = False,
    pool_slices: int = 24,
    refresh_every: int = 100,
    mix: dict[str, int] | None = None,
    ct_dose: tuple[float, float] = CT_DOSE_RANGE,
    body_ct: bool = False,
    quiet_body_ct: float = 0.0,
    loss: str = "l1",
) -> dict:
    """Train (or fine-tune from `init`) and return a summary; `out_dir/last.pt` holds the state.

    With `simulate`, the pairs are not read from `data_root` but degraded afresh from the cached
    protocol-v1 source volumes (`pool_slices` slices per source, a new pool every `refresh_every`
    steps), so the network never sees the same noise twice. `mix` gives each modality's share of
    a batch (CT=4,MRI=1,PET=2: CT's small HU residuals weigh little in an L1 over all tasks);
    `ct_dose` the dose range (x I0) of the re-posed CT slices in each pool; `body_ct` adds the
    body-CT training patients (`paired.BODY_CT_SPLIT`) to the CT sources of each pool, and
    `quiet_body_ct` is the share (0 to 1) of their slices whose own grain is taken out first
    (`paired.quieted_body_ct`). `loss` is `crop_loss`'s kind.

    The cosine schedule runs over `steps` optimizer steps or, with `time_budget` (minutes),
    over that much training time, so that a run on a slow or shared machine still anneals
    fully; training time is part of the checkpoint, so resumed runs keep their place.
    `stop_after` ends this call after that many steps (resume later).
    """
    if (steps is None) == (time_budget is None):
        raise ValueError("give exactly one of steps and time_budget")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "last.pt"
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    pairs = None if simulate else read_pairs(data_root, "train", modalities)

    model = build_model(_start_weights(init, config, out_dir), config, source=init) if init else AMIR(**config)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step, seconds = 0, 0.0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state["config"] != config:
            raise CheckpointError(f"{ckpt_path} was trained with config {state['config']}, not {config}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(rng, state["rng"])
        step, seconds = state["step"], state["seconds"]
    stream = FreshPairStream(pool_slices, rng, modalities, device, ct_dose, body_ct, quiet_body_ct) if simulate else None
    sampler = PatchSampler(stream.next() if stream else pairs, crop, rng, mix)

    def done_fraction() -> float:
        return step / steps if steps is not None else seconds / (time_budget * 60)

    body_note = "" if not body_ct or "CT" not in modalities else \
        f", {BODY_CT_NOTE}, {quiet_body_ct:.0%} of its slices {QUIET_BODY_CT_NOTE}" if quiet_body_ct else f", {BODY_CT_NOTE}"

    def checkpoint() -> None:
        record = {"step": step, "seconds": seconds, "config": config, "steps": steps, "time_budget": time_budget,
                  "lr": lr, "loss": loss, "batch_size": batch_size, "crop": crop, "mix": mix, "modalities": list(modalities), "init": init,
                  "data": f"protocol-v1 degraded afresh ({pool_slices} slices per source, new every {refresh_every} steps, "
                          f"re-posed CT at {ct_dose[0]:g}-{ct_dose[1]:g}x the dose{body_note})"
                  if simulate else str(data_root), "threads": torch.get_num_threads(), "device": _device_name(device)}
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(rng), **record},
                    ckpt_path)
        # the same facts without tensors, for manifests and logs
        write_atomically(out_dir / "run.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))

    losses: list[float] = []
    stop_at = step + stop_after if stop_after is not None else math.inf
    bar = tqdm(total=steps or round(time_budget * 60), initial=step if steps else round(seconds), disable=not progress,
               unit="step" if steps else "s", dynamic_ncols=True,
               bar_format=None if steps else "{l_bar}{bar}| {n:.0f}/{total} s of training [{elapsed}<{remaining}{postfix}]")
    try:
        while done_fraction() < 1 and step < stop_at:
            t0 = time.monotonic()
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, done_fraction())
            if stream and step % refresh_every == 0 and losses:
                sampler = PatchSampler(stream.next(), crop, rng, mix)
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for lq, hq in sampler.batch(batch_size):  # one forward per task, gradients summed
                out, balance = model(lq.to(device))
                share = len(lq) / batch_size * (crop_loss(out, hq.to(device), loss) + LOAD_BALANCING_WEIGHT * balance)
                share.backward()
                loss_value += share.item()
            optimizer.step()
            step += 1
            dt = time.monotonic() - t0
            seconds += dt
            losses.append(loss_value)
            bar.update(1 if steps else min(dt, bar.total - bar.n))  # a time bar must not overshoot (tqdm warns)
            bar.set_postfix(step=step, loss=f"{np.mean(losses[-20:]):.4f}", img_s=f"{batch_size / dt:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            if step % save_every == 0:
                checkpoint()
        bar.close()
        checkpoint()
    finally:  # a pool being simulated must not hold up the end of the run, nor an interrupted one
        if stream:
            stream.close()
    return {"step": step, "seconds": seconds, "losses": losses, "checkpoint": str(ckpt_path), "finished": done_fraction() >= 1}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def init_state_dict(init: str) -> dict[str, torch.Tensor]:
    """The weights `--init` names: a shipped model ('default' or its name) or a checkpoint file."""
    from ..api import read_weights

    return read_weights(init)[0]


def _start_weights(init: str, config: dict, out_dir: Path) -> dict[str, torch.Tensor]:
    """The `init` weights, deepened to `config` when it has more blocks; a deepened start is
    written to OUT/init.pth, so that the run can later be averaged with exactly where it began."""
    state = init_state_dict(init)
    if all(infer_config(state)[k] == config[k] for k in DEPTH):
        return state
    state = deepen(state, config)
    save_atomic(state, out_dir / "init.pth")
    return state


def export_weights(checkpoint: str | Path, out: str | Path) -> None:
    """Write the plain model state dict (official key names) of a training checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    save_atomic({k: v.contiguous() for k, v in state["model"].items()}, Path(out))


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", help="paired data root: ROOT/{CT,MRI,PET}/train/{LQ,HQ}/*.nii[.gz]")
    parser.add_argument("--simulate", action="store_true",
                        help="instead of DATA: protocol-v1 pairs degraded afresh from the cached source volumes")
    parser.add_argument("--pool-slices", type=int, default=24, help="with --simulate: slices per source in each pool")
    parser.add_argument("--refresh-every", type=int, default=100, help="with --simulate: steps between new pools")
    parser.add_argument("--ct-dose", default=",".join(f"{d:g}" for d in CT_DOSE_RANGE),
                        help="with --simulate: dose range LO,HI (x protocol v1's I0) of the re-posed CT slices")
    parser.add_argument("--body-ct", action="store_true",
                        help="with --simulate: the body-CT training patients join the CT sources of each pool")
    parser.add_argument("--quiet-body-ct", type=float, default=0.0, metavar="SHARE",
                        help="with --body-ct: the share (0 to 1) of those patients' slices whose own grain is "
                             f"taken out first (BM3D, every {BODY_CT_QUIET_STRIDE}th slice, cached)")
    parser.add_argument("--out", required=True, help="output folder (checkpoint last.pt, weights.pth)")
    parser.add_argument("--config", default="slim", help=f"model size: {', '.join(CONFIGS)}, a .json file or inline JSON")
    parser.add_argument("--steps", type=int, help="total optimizer steps of the cosine schedule (default 20000)")
    parser.add_argument("--time-budget", type=float, help="instead of --steps: minutes of training the cosine schedule spans")
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--crop", default="64",
                        help="square crop side, a multiple of 8; or one per modality: CT=64,MRI=128,PET=64")
    parser.add_argument("--mix", help="shares of a batch per modality, like CT=4,MRI=1,PET=2 (default: in turn)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--loss", choices=LOSSES, default="l1",
                        help="l1, or log-l1: every crop's L1 weighted by the inverse of its own, within its task")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from weights: 'default', a shipped name, or a checkpoint file; "
                             "a --config with more blocks grows them (the new blocks start as the identity)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--stop-after", type=int, help="run at most this many steps now (resume later with --resume)")
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated subset of the task table's modalities")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def parse_crop(spec: str, modalities: tuple[str, ...]) -> int | dict[str, int]:
    """`--crop`: "64" for every modality, or "CT=64,MRI=128,PET=64" naming each one trained."""
    error = ValueError(f"--crop must be a side (a multiple of 8, at least 16) or one per modality "
                       f"like CT=64,MRI=128,PET=64; got {spec!r}")
    try:
        sides = per_modality(spec, modalities, error) if "=" in spec else {m: int(spec) for m in modalities}
    except ValueError:
        raise error from None
    if any(c % 8 or c < 16 for c in sides.values()):
        raise error
    return sides if "=" in spec else sides[modalities[0]]


def parse_mix(spec: str | None, modalities: tuple[str, ...]) -> dict[str, int] | None:
    """`--mix`: whole-number shares of each batch, like CT=4,MRI=1,PET=2; None means one each, in turn."""
    if spec is None:
        return None
    error = ValueError(f"--mix must give a whole share of at least 1 to each modality trained, like "
                       f"{','.join(f'{m}=1' for m in modalities)}; got {spec!r}")
    shares = per_modality(spec, modalities, error)
    if any(v < 1 for v in shares.values()):
        raise error
    return shares


def parse_dose(spec: str) -> tuple[float, float]:
    """`--ct-dose`: "LO,HI", two positive factors of I0 with LO <= HI."""
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0 < lo <= hi < math.inf:
        raise ValueError(f"--ct-dose must be LO,HI with 0 < LO <= HI, like 0.05,8; got {spec!r}")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    modalities = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    bad = [m for m in modalities if m not in MODALITIES]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for, but this torch build sees no CUDA device")
    if not 0 <= args.quiet_body_ct <= 1:
        raise ValueError(f"--quiet-body-ct is a share from 0 to 1, got {args.quiet_body_ct:g}")
    if (args.data is None) == (not args.simulate):
        raise ValueError("give either a paired data folder or --simulate")
    if args.body_ct and not args.simulate:
        raise ValueError("--body-ct needs --simulate")
    if args.quiet_body_ct and not args.body_ct:
        raise ValueError("--quiet-body-ct needs --body-ct")
    if args.pool_slices < 2 or args.refresh_every < 1:
        raise ValueError("--pool-slices must be at least 2 and --refresh-every at least 1")
    if bad or not modalities:
        raise ValueError(f"--modalities must be a subset of {','.join(MODALITIES)}, got {args.modalities!r}")
    crop = parse_crop(args.crop, modalities)
    mix = parse_mix(args.mix, modalities)
    ct_dose = parse_dose(args.ct_dose)
    config = resolve_config(args.config)
    if args.steps is not None and args.time_budget is not None:
        raise ValueError("give --steps or --time-budget, not both")
    steps = args.steps if args.steps is not None or args.time_budget is not None else 20000
    summary = train(args.data, args.out, config, steps, args.batch_size, crop, args.lr, args.device,
                    args.seed, args.init, args.resume, args.save_every, args.time_budget, args.stop_after, modalities,
                    simulate=args.simulate, pool_slices=args.pool_slices, refresh_every=args.refresh_every, mix=mix,
                    ct_dose=ct_dose, body_ct=args.body_ct, quiet_body_ct=args.quiet_body_ct, loss=args.loss)
    export_weights(summary["checkpoint"], Path(args.out) / "weights.pth")
    losses = summary["losses"]
    tail = f", mean loss of the last 100 steps {np.mean(losses[-100:]):.4f}" if losses else ""
    state = "finished" if summary["finished"] else "stopped (resume with --resume)"
    print(f"{state} at step {summary['step']} after {summary['seconds'] / 60:.1f} min of training{tail}; "
          f"weights: {Path(args.out) / 'weights.pth'}")
    return 0
