"""Split weights into buckets, and gather ZeRO-3 parameters bucket by bucket.

A weight sync never moves the whole model at once: it moves buckets of at most
`bucket_numel` elements, in a stable order (the order the names come in, which for
`named_parameters()` is the same on every learner rank and every run).

    plan_buckets([(name, numel), ...], bucket_numel)  -> [[name, ...], ...]
    split_into_buckets(state_dict, bucket_numel)      -> [{name: tensor}, ...]
    gather_zero3_buckets(named_params, bucket_numel)  -> yields {name: full CPU tensor}
    assert_same_weights(a, b, atol=0)                 -> the debug check rollout == learner

A tensor larger than `bucket_numel` gets a bucket of its own (it cannot be split).

ZeRO-3: a partitioned parameter reports `numel() == 0`; its full size is `ds_numel`
and its full shape `ds_shape`. Gathering is a collective over the learner's default
group: EVERY learner rank must iterate `gather_zero3_buckets` to the end, in step.
"""

from collections.abc import Iterable, Iterator

import torch


def full_numel(p: torch.Tensor) -> int:
    """Elements of the full tensor: `ds_numel` for a ZeRO-3 partitioned parameter."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the full tensor: `ds_shape` for a ZeRO-3 partitioned parameter."""
    return tuple(getattr(p, "ds_shape", p.shape))


def plan_buckets(named_sizes: Iterable[tuple[str, int]], bucket_numel: int) -> list[list[str]]:
    """Group names, in order, into buckets whose sizes sum to at most `bucket_numel`.

    A name whose size alone exceeds `bucket_numel` gets a bucket of its own.
    """
    if bucket_numel <= 0:
        raise ValueError(f"bucket_numel must be positive, got {bucket_numel}")
    buckets: list[list[str]] = []
    current: list[str] = []
    current_numel = 0
    for name, numel in named_sizes:
        if current and current_numel + numel > bucket_numel:
            buckets.append(current)
            current, current_numel = [], 0
        current.append(name)
        current_numel += numel
    if current:
        buckets.append(current)
    return buckets


def split_into_buckets(state_dict: dict[str, torch.Tensor], bucket_numel: int) -> list[dict[str, torch.Tensor]]:
    """{name: tensor} -> [{name: tensor}, ...] in the dict's order, each at most bucket_numel elements."""
    plan = plan_buckets(((k, v.numel()) for k, v in state_dict.items()), bucket_numel)
    return [{k: state_dict[k] for k in names} for names in plan]


def gather_zero3_buckets(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    bucket_numel: int,
    rank0_only: bool = False,
    to_cpu: bool = True,
    pin: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields {name: full tensor} per bucket, gathering one bucket at a time.

    to_cpu=True: copies on the CPU, which outlive the iteration: for the object store,
    checkpoints and export. With pin=True (a bucket on its way to the object store) they
    are pinned and copied asynchronously from a GPU, one wait per bucket; checkpoints and
    exports stay in pageable memory (pinned memory is page-locked and cached for reuse).
    to_cpu=False: the gathered tensors themselves, on the learner's device, valid only
    until the next bucket is asked for: for the collective transport, which packs them
    straight into its device buffer (no trip through host memory).

    Buckets are planned by the FULL size of each parameter (`ds_numel`), so each gathered
    bucket holds at most `bucket_numel` elements (or one larger parameter).

    Collective: every learner rank must call this with the same parameters and iterate
    it to the end (a rank that stops early deadlocks the others in the next gather).
    By default every rank gets the tensors; with `rank0_only=True` only global rank 0
    pays for the CPU copies and the other ranks get empty dicts (they still iterate).

    Parameters that are not ZeRO-3 partitioned (no `ds_id`) are copied as they are, so
    the same call works for a plain module (tests, colocated runs without DeepSpeed).
    """
    named = list(named_params)
    params = dict(named)
    copy_here = not rank0_only or _global_rank() == 0
    for names in plan_buckets(((n, full_numel(p)) for n, p in named), bucket_numel):
        bucket_params = [params[n] for n in names]
        with _gathered(bucket_params):
            if not copy_here:
                yield {}
            elif to_cpu:
                yield _host_copies({n: params[n].detach() for n in names}, pin)
            else:
                yield {n: params[n].detach() for n in names}
        # leaving the context re-partitions the bucket: its full copies are freed here


def _host_copies(bucket: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    """CPU copies of a bucket; with pin, from a GPU into pinned memory, asynchronously, then one wait."""
    if not pin or not any(t.is_cuda for t in bucket.values()):
        return {n: t.to("cpu", copy=True) for n, t in bucket.items()}
    out = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
           for n, t in bucket.items()}
    torch.cuda.current_stream().synchronize()
    return out


def _gathered(params: list[torch.nn.Parameter]):
    """GatheredParameters for ZeRO-3 params (read only: modifier_rank=None); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):
        return _NoGather()
    import deepspeed  # only learners with ZeRO-3 parameters need it

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class _NoGather:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    """Raise AssertionError naming the first tensor (in a's order) that differs between a and b.

    Checks names, shapes, dtypes and values (exactly when atol == 0). Tensors may live on
    different devices; they are compared on CPU.
    """
    missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
    if missing or extra:
        raise AssertionError(f"weights differ in names: missing from b {missing[:5]}, extra in b {extra[:5]}"
                             f" ({len(missing)} missing, {len(extra)} extra)")
    for name, x in a.items():
        y = b[name]
        if tuple(x.shape) != tuple(y.shape):
            raise AssertionError(f"weights differ at {name!r}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise AssertionError(f"weights differ at {name!r}: dtype {x.dtype} vs {y.dtype}")
        x, y = x.detach().cpu(), y.detach().cpu()
        same = torch.equal(x, y) if atol == 0 else torch.allclose(x.double(), y.double(), rtol=0.0, atol=atol)
        if not same:
            diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            raise AssertionError(f"weights differ at {name!r}: max |a - b| = {diff:.3g} > atol {atol}")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A short exact fingerprint of a state dict (names, dtypes, shapes and bytes), order-free.

    The debug check that a rollout worker holds exactly the learner's snapshot: both
    sides digest their copy and compare, without shipping the weights back.
    """
    import hashlib

    per_key = []
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        per_key.append(h.digest())
    return hashlib.sha256(b"".join(per_key)).hexdigest()[:16]
