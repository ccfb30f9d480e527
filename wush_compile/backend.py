"""``torch.compile(model, backend="wush")``: run the wush FX passes on the dynamo graph, then hand it to Inductor.

Resolves by name through the ``torch_dynamo_backends`` entry point (no import needed) and after
``import wush_compile``. Accepts ``mode=`` and ``options=`` like Inductor: Inductor's own options pass through
(validated by Inductor); ours are taken out first:

    options={"kernel": "triton_decode"}   pin the kernel (a KernelChoice value; default "auto")
    options={"group": False}              do not group layers sharing an input and a transform
    options={"inductor": False}           run the rewritten FX graph eagerly instead of Inductor (debugging)

A graph with rewritten layers is compiled with Inductor's ``emulate_precision_casts=True`` unless ``options`` sets
it: Inductor then rounds bf16/fp16 intermediates (norms, rotary, residuals) where eager rounds them. An FP4
quantizer turns a one-ulp difference in its input into a whole code step, so without this the compiled model's
greedy text parts from eager's within a few tokens (SmolLM2, bf16, H100: token 4 without, 48 of 48 equal with;
benchmarks/RESULTS.md). Graphs without calibrated layers get Inductor's defaults.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx

from .config import KernelChoice
from .ops import dispatch
from .passes import LinearRecord, PassContext, group_shared_inputs, rewrite_linears
from .passes._common import count
from .report import format_rows

logger = logging.getLogger(__name__)

__all__ = ["wush_backend", "BackendOptions", "GraphResult", "register", "collect_results", "BACKEND_NAME"]

BACKEND_NAME = "wush"
ARTIFACT_NAME = "wush_rewrite_report"


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The backend's own options (the rest of ``options=`` goes to Inductor)."""

    kernel: KernelChoice = KernelChoice.AUTO
    group: bool = True
    inductor: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", KernelChoice.parse(self.kernel))
        for flag in ("group", "inductor"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"wush backend: options[{flag!r}] must be True or False, got {getattr(self, flag)!r}")

    @classmethod
    def split(cls, options: Optional[dict[str, Any]]) -> tuple["BackendOptions", dict[str, Any]]:
        """(our options, Inductor's options) from a torch.compile ``options`` dict."""
        options = dict(options or {})
        ours = {f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options}
        return cls(**ours), options


@dataclasses.dataclass
class GraphResult:
    """What the passes did to one dynamo graph."""

    index: int
    records: list[LinearRecord]
    groups: int
    code: str  # the rewritten graph's Python code
    graph_module: fx.GraphModule  # a copy of the rewritten graph (before Inductor touches it)
    options: BackendOptions

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.records)

    def table(self) -> str:
        return format_rows(self.records)


_COLLECTORS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("wush_collectors", default=())
_GRAPH_COUNT = [0]


@contextlib.contextmanager
def collect_results() -> Iterator[list[GraphResult]]:
    """Collect the :class:`GraphResult` of every graph the backend compiles inside the block."""
    sink: list[GraphResult] = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (sink,))
    try:
        yield sink
    finally:
        _COLLECTORS.reset(token)


def _inductor_config(mode: Optional[str], options: dict[str, Any]) -> dict[str, Any]:
    # Inductor's own handling of mode= and options= (same validation, same errors as backend="inductor").
    return dict(torch._TorchCompileInductorWrapper(mode, options, None).config)


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def run_passes(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions) -> GraphResult:
    """Run the wush passes on ``gm`` in place and describe what they did."""
    index = _GRAPH_COUNT[0]
    _GRAPH_COUNT[0] += 1
    pinned = opts.kernel if opts.kernel is not KernelChoice.AUTO else dispatch.current_pin()
    ctx = PassContext(example_inputs, pinned=pinned, group=opts.group, graph_index=index).bind(gm)
    count("graphs")
    records = rewrite_linears(gm, ctx)
    groups = group_shared_inputs(gm, ctx) if any(r.rewritten for r in records) else 0
    return GraphResult(index, records, groups, gm.code, _snapshot(gm), opts)


def _emit(result: GraphResult) -> None:
    n_cal = sum(r.kind == "calibrated" for r in result.records)
    if n_cal == 0:
        count("graphs_without_calibrated_linear")
        logger.info(
            "wush backend: graph %d has no calibrated Linear (wush.linear); compiling it with plain Inductor "
            "(calibrate the model with calibrate.calibrate to get FP4 layers)",
            result.index,
        )
    else:
        logger.info(
            "wush backend: graph %d: rewrote %d of %d calibrated Linears, %d groups, %d plain Linears left alone",
            result.index, result.rewritten, n_cal, result.groups, sum(r.kind == "plain" for r in result.records),
        )
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": ARTIFACT_NAME, "encoding": "string"},
        payload_fn=lambda: f"graph {result.index}\n{result.table()}\n\n{result.code}",
    )
    for sink in _COLLECTORS.get():
        sink.append(result)


def wush_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> Callable[..., Any]:
    """The ``wush`` dynamo backend: rewrite calibrated Linears into the fast ops, then compile with Inductor."""
    opts, inductor_options = BackendOptions.split(options)
    config_patches = _inductor_config(mode, inductor_options)
    result = run_passes(gm, example_inputs, opts)
    _emit(result)
    if result.rewritten:
        _prepare_devices(gm, example_inputs, result.records)
        config_patches.setdefault("emulate_precision_casts", True)
    if not opts.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config_patches)


def _prepare_devices(gm: fx.GraphModule, example_inputs: Sequence[Any], records: Sequence[LinearRecord]) -> None:
    """Allocate the kernels' persistent buffers and per-layer derived operands now: under mode="reduce-overhead"
    the first kernel call happens in CUDA-graph warm-up, where a lazily allocated buffer would land in the graph's
    memory pool."""
    devices = {t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"}
    if not devices:
        return
    transforms, biases = _fused_operands(gm, example_inputs)
    routes = {r.kernel for r in records if r.rewritten and r.kernel}
    for device in devices:
        dispatch.prepare(device, transforms, biases, routes)


def _fused_operands(
    gm: fx.GraphModule, example_inputs: Sequence[Any], device_type: str = "cuda"
) -> tuple[list, list]:
    """The real tensors on ``device_type`` fed as transform and bias to the fused ops (graph inputs or module
    attributes), in graph order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value = {n: t for n, t in zip(placeholders, example_inputs)}

    def real(node: Any) -> Optional[torch.Tensor]:
        if not isinstance(node, fx.Node):
            return None
        t = value.get(node)
        if t is None and node.op == "get_attr":
            t = gm
            for part in str(node.target).split("."):
                t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or t.device.type != device_type:
            return None
        return t

    fused = {torch.ops.wush.fused_linear.default, torch.ops.wush.fused_linear_group.default}
    transforms, biases = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in fused:
            continue
        transforms.append(real(node.args[3]))
        bias = node.args[6]
        biases.extend(real(b) for b in (bias if isinstance(bias, (list, tuple)) else [bias]))
    return [t for t in transforms if t is not None], [b for b in biases if b is not None]


def _reset() -> None:
    # Like Inductor's wrapper: drop recorded CUDA graphs when dynamo resets.
    if torch.cuda.is_available():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    # ...and the backends' device state and derived per-layer operands (fp32 transforms, swizzled scales) that
    # held their sources alive.
    dispatch.clear()


wush_backend.reset = _reset  # type: ignore[attr-defined]


def register() -> None:
    """Register ``backend="wush"`` with dynamo; idempotent, and consistent with the entry point.

    When dynamo has already discovered the ``torch_dynamo_backends`` entry point but not loaded it, it loads
    this same function on first lookup, so registering here too would be a duplicate; leave it to dynamo.
    """
    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS:
        if registry._COMPILER_FNS[BACKEND_NAME] is not wush_backend:
            raise RuntimeError(
                f"torch.compile backend {BACKEND_NAME!r} is already registered to "
                f"{registry._COMPILER_FNS[BACKEND_NAME]!r}; uninstall the other package that claims the name"
            )
        return
    if registry._BACKENDS.get(BACKEND_NAME) is not None:  # a discovered, not yet loaded entry point
        return
    registry.register_backend(compiler_fn=wush_backend, name=BACKEND_NAME)
