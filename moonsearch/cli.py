"""The ``moonsearch`` command line: thin commands over the library (heavy imports inside commands,
so ``--help`` is instant). Errors are one readable line and a non-zero exit."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from moonsearch.paths import default_index, remember_index

app = typer.Typer(help="moonsearch: multimodal product search (MOON encoders + per-category FAISS indices).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: recall@k on a behaviour log, ANN index quality and speed.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()
err = Console(stderr=True, soft_wrap=True)


def friendly(fn):
    """Bad input (a ``UserError``, or a path that is not there or not readable) becomes one line on
    stderr and exit code 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from moonsearch.errors import UserError

        try:
            return fn(*a, **kw)
        except (UserError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
            from rich.markup import escape

            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # the message is text, not markup
            raise typer.Exit(2)

    return wrapper


def at_least(name: str, value, low: int = 1) -> None:
    """``--name`` must be >= low (None: not given)."""
    from moonsearch.errors import UserError

    if value is not None and value < low:
        raise UserError(f"{name} {value}: expected {low} or more")


def _progress(description: str):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class _Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return super().render(task) if speed is None else f"{speed:,.1f} items/s"

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), _Rate(""),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False)


def _with_progress(prog):
    def start(total):
        task = prog.add_task("", total=total)
        return lambda n=1: prog.advance(task, n)

    return start


@app.command("demo-data")
@friendly
def demo_data(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("demo"),
    n: Annotated[int, typer.Option(help="number of products")] = 2000,
    seed: Annotated[int, typer.Option(help="random seed: same seed, byte-identical files")] = 0,
    vectors_only: Annotated[bool, typer.Option(help="no images: vectors.npy + catalog, scales to 1M")] = False,
    dim: Annotated[int, typer.Option(help="vector dimension (vectors-only mode)")] = 256,
    image_size: Annotated[int, typer.Option(help="photo side in pixels")] = 160,
    workers: Annotated[Optional[int], typer.Option(help="render processes (default: cores, max 4)")] = None,
):
    """Write the synthetic product world: catalog.parquet, images/, behavior.parquet, queries/."""
    from moonsearch.data.synthetic import generate_vectors, generate_world

    at_least("--n", n), at_least("--dim", dim), at_least("--image-size", image_size, 32), at_least("--workers", workers)
    if vectors_only:
        summary = generate_vectors(out, n, dim=dim, seed=seed)
    else:
        with _progress("rendering") as prog:
            summary = generate_world(out, n=n, seed=seed, image_size=image_size, workers=workers,
                                     progress=_with_progress(prog))
    console.print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


@app.command()
@friendly
def validate(
    catalog: Annotated[Path, typer.Argument(help="catalog parquet file")],
    images: Annotated[bool, typer.Option(help="decode every image (and fetch URLs)")] = True,
    rejects: Annotated[Optional[Path], typer.Option(help="rejects file (default: <catalog>.rejects.jsonl)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds per image URL")] = 10.0,
):
    """Check a catalog: summary, then every problem with row number, item id and reason.
    Exit code 0 when clean, 1 when problems were found, 2 when the catalog is unusable."""
    from rich.table import Table

    from moonsearch.data.catalog import open_catalog, validate_catalog, write_rejects

    total = open_catalog(catalog).metadata.num_rows
    with _progress("checking") as prog:
        task = prog.add_task("", total=total)
        s = validate_catalog(catalog, check_images=images, timeout=timeout,
                             on_progress=lambda n: prog.advance(task, n))
    t = Table(title=f"{catalog}", show_header=False)
    t.add_row("rows", str(s.rows))
    t.add_row("usable rows", str(s.valid))
    t.add_row("categories", f"{len(s.categories)} (largest: " + ", ".join(
        f"{c} {n}" for c, n in s.categories.most_common(3)) + ")")
    t.add_row("images per item", ", ".join(f"{k}: {v}" for k, v in sorted(s.images_per_item.items())))
    t.add_row("attribute keys", ", ".join(f"{k} ({v})" for k, v in s.attribute_keys.most_common(12)))
    t.add_row("problems", str(len(s.problems)))
    console.print(t)
    for p in s.problems:
        console.print(p.line(), highlight=False, markup=False, soft_wrap=True)
    path = write_rejects(s.problems, rejects or catalog.with_suffix(".rejects.jsonl"))
    if s.problems:
        console.print(f"{len(s.problems)} problems listed in {path}")
        raise typer.Exit(1)


@app.command()
@friendly
def index(
    catalog: Annotated[Path, typer.Argument(help="catalog parquet file")],
    out: Annotated[Path, typer.Option(help="index folder")] = Path("index"),
    model: Annotated[Optional[str], typer.Option(help="encoder name (see 'moonsearch models'; default: "
                                                 "moon-mini, or the index's own with --append)")] = None,
    level: Annotated[Optional[int], typer.Option(help="category depth for the per-category split (default: leaf)")] = None,
    append: Annotated[bool, typer.Option(help="add the catalog's new items to an existing index")] = False,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists visited per query (default 32; "
                                                  "--append: the index's)")] = None,
    rerank: Annotated[Optional[int], typer.Option(help="exact re-rank of rerank*k PQ candidates (0: off; "
                                                  "default 8; --append: the index's)")] = None,
    bytes_per_vector: Annotated[Optional[float], typer.Option(help="PQ bytes per vector (default dim/4)")] = None,
    batch_size: Annotated[int, typer.Option(help="encoder batch size")] = 32,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: cuda if present)")] = None,
    vectors: Annotated[Optional[Path], typer.Option(help="precomputed embeddings (.npy, row i = catalog row i): "
                                                    "no encoder; streamed, never all in RAM; resumable")] = None,
    ray: Annotated[Optional[str], typer.Option(help="embed and build on Ray: 'auto' (RAY_ADDRESS, else a local "
                                               "Ray) or a cluster address HOST:PORT")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(help="encoder actors on Ray (default: one per GPU, "
                                                      "else one per CPU)")] = None,
    recheck_urls: Annotated[bool, typer.Option(help="ask each picture URL's server (HEAD) whether the picture "
                                               "changed, and embed the item again if it did")] = False,
):
    """Embed a catalog and build one FAISS index per category (resumable; re-runs reuse embeddings)."""
    from moonsearch.index.faiss_backend import IndexParams
    from moonsearch.indexer.run import IndexJob, run_index

    if vectors is not None:
        from moonsearch.errors import UserError
        from moonsearch.index.stream import build_from_vectors

        if append or model:
            raise UserError("--vectors builds a new index from precomputed embeddings: drop --append / --model")
        given = {k: v for k, v in dict(nprobe=nprobe, rerank=rerank, bytes_per_vector=bytes_per_vector).items()
                 if v is not None}
        with _progress("encoding") as prog:
            rep = build_from_vectors(catalog, vectors, out, IndexParams(**given), level, log=console.print,
                                     progress=_with_progress(prog))
        remember_index(out)
        console.print(f"indexed {rep['items']} items into {rep['categories']} categories at {out} "
                      f"({rep['factory']}, shared quantizer; {rep['total_s']:.1f}s)")
        if rep["skipped"]:
            console.print(f"{rep['skipped']} rows skipped, listed in {out / 'rejects.jsonl'}")
        return

    at_least("--level", level), at_least("--nprobe", nprobe), at_least("--rerank", rerank, 0)
    at_least("--batch-size", batch_size)
    if bytes_per_vector is not None and bytes_per_vector <= 0:
        at_least("--bytes-per-vector", bytes_per_vector)
    given = {k: v for k, v in dict(nprobe=nprobe, rerank=rerank, bytes_per_vector=bytes_per_vector).items()
             if v is not None}
    at_least("--ray-actors", ray_actors)
    job = IndexJob(catalog, out, model, level, IndexParams(**given) if given else None, append, batch_size,
                   device=device, ray=ray, ray_actors=ray_actors, recheck_urls=recheck_urls)
    with _progress("embedding") as prog:
        rep = run_index(job, progress=_with_progress(prog))
    remember_index(out)
    if rep.ray:
        console.print(f"Ray at {rep.ray['address']}: {rep.ray['cpus']:g} CPUs, {rep.ray['gpus']:g} GPUs"
                      + (f"; {rep.ray['actors']} encoder actors, batch {rep.ray['batch_size']}" if "actors" in rep.ray
                         else ""))
    console.print(f"indexed {rep.indexed} items into {rep.categories} categories at {out} "
                  f"(embedded {rep.embedded}, reused {rep.cached}; {rep.seconds['total']:.1f}s)")
    if rep.retried:
        console.print(f"{rep.retried} items embedded again: a picture of theirs had failed for a temporary "
                      "reason on an earlier run")
    if rep.problems:
        console.print(f"{len(rep.problems)} problems (rows or images skipped) listed in {rep.rejects_path}")


@app.command()
@friendly
def query(
    text: Annotated[Optional[str], typer.Argument(help="query text")] = None,
    image: Annotated[Optional[str], typer.Option(help="query photo: a file or an http(s) URL (with TEXT: a "
                                                 "multimodal query)")] = None,
    product: Annotated[Optional[str], typer.Option(help="item id: find similar products")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="number of hits")] = 10,
    category: Annotated[Optional[list[str]], typer.Option(help="restrict to a category path prefix, "
                                                          "e.g. 'apparel > shoes' (repeatable)")] = None,
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="index folder (default: last built)")] = None,
    route: Annotated[Optional[int], typer.Option(help="search only the R categories nearest the query")] = None,
    include_group: Annotated[bool, typer.Option(help="with --product: keep the item's variants")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print hits as JSON")] = False,
    model: Annotated[Optional[str], typer.Option(help="encoder (default: the index's)")] = None,
    picture: Annotated[Optional[Path], typer.Option(help="also save the hits with their photos as a PNG")] = None,
    mode: Annotated[str, typer.Option(help="vector (embeddings), lexical (BM25 over id, title, category, "
                                      "attributes) or hybrid (both, fused)")] = "hybrid",
    understand: Annotated[bool, typer.Option(help="read catalog values (colour, brand, category ...) in the "
                                             "text as filters or boosts")] = True,
):
    """Search by text, by photo (optionally with text), or by product id."""
    from moonsearch.search.service import SearchService

    from moonsearch.errors import UserError

    if not text and image is None and product is None:
        raise UserError("give query text, --image PATH or --product ITEM_ID")
    if product is not None and (text or image is not None):
        raise UserError("--product finds products like an item and takes no query text or --image; "
                        "give one of: TEXT, --image PATH (with optional TEXT), --product ITEM_ID")
    if include_group and product is None:
        raise UserError("--include-group applies to --product searches only")
    at_least("-k", k), at_least("--route", route, 0)
    from moonsearch.search.service import MODES

    if mode not in MODES:
        raise UserError(f"--mode {mode}: expected one of {', '.join(MODES)}")
    svc = SearchService(index_dir or default_index(), encoder=model)
    kw = dict(k=k, categories=category, route=route)
    query_img = None
    understood = {}
    if product is not None:
        hits = svc.search_product(product, exclude_group=not include_group, **kw)
        label = f"products like {product}"
    elif image is not None:
        from moonsearch.data.images import load_image

        query_img = load_image(image, Path.cwd())  # a path (relative to here), file:// or http(s) URL
        res = svc.search(text, query_img, mode=mode, understand=understand, **kw)
        hits, understood = res.hits, res.understood
        label = f"photo {image}" + (f" + '{text}'" if text else "")
    else:
        res = svc.search(text, mode=mode, understand=understand, **kw)
        hits, understood = res.hits, res.understood
        label = f"'{text}' ({res.mode})"
    if picture:
        from moonsearch.search.picture import hits_picture

        hits_picture(hits, label, picture, query_img)
    if as_json:
        print(json.dumps({"understood": understood, "hits": [h.to_dict() for h in hits]}, ensure_ascii=False,
                         indent=1))
        return
    if understood:
        from moonsearch.search.understand import describe

        console.print(f"understood: {describe(understood)}", markup=False)
    print_hits(hits, label)
    if picture:
        console.print(f"picture: {picture}")


def print_hits(hits, label: str) -> None:
    from rich.table import Table

    t = Table(title=f"{label}: {len(hits)} hits")
    for col in ("#", "score", "id", "title", "category", "attributes"):
        t.add_column(col, overflow="fold")
    for i, h in enumerate(hits, 1):
        attrs = ", ".join(f"{k}={v}" for k, v in list(h.attributes.items())[:4])
        t.add_row(str(i), f"{h.score:.3f}", h.item_id, h.title, " > ".join(h.category), attrs)
    console.print(t)


@app.command()
@friendly
def serve(
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="index folder (default: last built)")] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback unless told otherwise)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    workers: Annotated[int, typer.Option(help="server processes (each loads the index and the encoder)")] = 1,
    model: Annotated[Optional[str], typer.Option(help="encoder (default: the index's)")] = None,
    allow_image_urls: Annotated[bool, typer.Option(help="let /search fetch an http(s) image URL "
                                                   "(5 s timeout, 10 MB cap)")] = False,
    max_batch: Annotated[int, typer.Option(help="most queries per encoder call")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="longest wait for a batch to fill, in ms")] = 5.0,
    reload_interval: Annotated[float, typer.Option(help="seconds between checks of the index manifest "
                                                   "(hot reload; 0: off, SIGHUP still reloads)")] = 1.0,
    access_log: Annotated[bool, typer.Option(help="log every request (off: /metrics counts them)")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="serve on Ray Serve: 'auto' (RAY_ADDRESS, else a "
                                               "local Ray) or a cluster address HOST:PORT")] = None,
    shards: Annotated[int, typer.Option(help="with --ray: search shards (categories dealt by item count)")] = 1,
    replicas: Annotated[int, typer.Option(help="with --ray: replicas of each deployment")] = 1,
):
    """HTTP search API and search page (open http://HOST:PORT/ in a browser). MOONSEARCH_API_KEY set:
    every endpoint but /health and the page needs the X-API-Key header. With --ray: the same API from
    Ray Serve deployments (an encoder, N shards, a router; README "Scale-out on Ray")."""
    import os

    from moonsearch.serve.engine import ServeOptions

    at_least("--workers", workers), at_least("--max-batch", max_batch), at_least("--port", port, 0)
    if not 0 <= max_wait_ms <= 1000:
        from moonsearch.errors import UserError

        raise UserError(f"--max-wait-ms {max_wait_ms}: expected 0..1000")
    folder = index_dir or default_index()
    opts = ServeOptions(folder, model, allow_image_urls, max_wait_ms, max_batch, reload_interval,
                        os.environ.get("MOONSEARCH_API_KEY") or None)
    if ray is not None:
        at_least("--shards", shards), at_least("--replicas", replicas)
        if workers != 1:
            from moonsearch.errors import UserError

            raise UserError("--workers is for the single-machine server; with --ray use --replicas")
        from moonsearch.serve.ray_app import run as run_on_ray

        console.print(f"deploying {folder} on Ray ({shards} shard(s), {replicas} replica(s) each) ...")
        run_on_ray(opts, ray, shards, replicas, host, port, poll=reload_interval, log=console.print)
        return
    console.print(f"loading {folder} and warming the encoder ...")
    from moonsearch.serve.app import serve as run_server

    run_server(opts, host, port, workers, access_log=access_log)


@app.command()
@friendly
def delete(
    ids: Annotated[list[str], typer.Argument(help="item ids to remove")],
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="index folder (default: last built)")] = None,
):
    """Delete items from an index (no re-embedding, no full rebuild)."""
    from moonsearch.index.index_set import IndexSet

    s = IndexSet.load(index_dir or default_index())
    n = s.delete(set(ids))
    console.print(f"removed {n} of {len(ids)} ids; {s.count} items left")


@app.command()
@friendly
def models():
    """List the encoder names the registry knows."""
    from moonsearch.models.base import available

    for pattern, help_ in available():
        console.print(f"[bold]{pattern}[/bold]  {help_}", highlight=False)


@app.command("fit-clip-mini")
@friendly
def fit_clip_mini(
    out: Annotated[Optional[Path], typer.Option(help="heads file (default: the packaged one)")] = None,
    n: Annotated[int, typer.Option(help="products in the training world")] = 1500,
    seed: Annotated[int, typer.Option(help="training world seed (the demo uses 0)")] = 1234,
    epochs: Annotated[int, typer.Option()] = 40,
):
    """Rebuild clip-mini's projection heads (about 3 minutes on 2 CPU cores)."""
    from moonsearch.models.clip.mini import HEADS_FILE
    from moonsearch.trainer.clip_mini import main as fit

    at_least("--n", n, 16), at_least("--epochs", epochs)
    fit(out or HEADS_FILE, n=n, seed=seed, epochs=epochs, log=console.print)


@app.command()
@friendly
def train(
    preset: Annotated[Optional[str], typer.Option(help="preset (moonsearch/trainer/presets): moon-mini-cpu, "
                                                  "clip-finetune, moon-mini-no-moe, moon-mini-unguided, "
                                                  "moon-mini-no-crops, moon-mini-in-batch, moon-tiny-test, "
                                                  "moon-qwen2.5-vl-3b")] = "moon-mini-cpu",
    config: Annotated[Optional[Path], typer.Option(help="YAML file with config overrides")] = None,
    model: Annotated[Optional[str], typer.Option(help="encoder to start from (registry name)")] = None,
    data: Annotated[Optional[str], typer.Option(help="folder with catalog.parquet + behavior.parquet")] = None,
    out: Annotated[Optional[str], typer.Option(help="runs folder")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="run folder name (resumes when it exists)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="global batch size")] = None,
    queue_size: Annotated[Optional[int], typer.Option(help="past-step negatives (0: off)")] = None,
    hard_negatives: Annotated[Optional[bool], typer.Option(help="same-category hard negatives")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="any config key: --set lr=1e-4 "
                                                      "--set 'model_options={use_moe: false}' (YAML values)")] = None,
    publish: Annotated[bool, typer.Option(help="copy the final moon-mini checkpoint into the package: it "
                                          "becomes the weights of the encoder 'moon-mini'")] = False,
    dry_run: Annotated[bool, typer.Option(help="print parameter counts and a memory estimate per rank, "
                                          "then stop (nothing is loaded)")] = False,
    world: Annotated[Optional[int], typer.Option(help="ranks for --dry-run (default: $WORLD_SIZE or 1)")] = None,
):
    """Train a MOON checkpoint (or fine-tune a CLIP baseline) on a behaviour log.

    Multi-GPU / multi-node: torchrun --nproc-per-node N -m moonsearch.trainer.loop --preset NAME."""
    import yaml

    from moonsearch.errors import UserError
    from moonsearch.trainer.config import load_config
    from moonsearch.trainer.loop import train as run_training

    extra = {}
    for kv in set_ or []:
        if "=" not in kv:
            raise UserError(f"--set {kv!r}: expected key=value")
        k, v = kv.split("=", 1)
        extra[k.strip()] = yaml.safe_load(v)
    named = dict(model=model, data=data, out=out, run_name=run_name, steps=steps, batch_size=batch_size,
                 queue_size=queue_size, hard_negatives=hard_negatives)
    for k, v in extra.items():  # --set steps=400 is the same as --steps 400; both, differing, is an error
        if named.get(k) is not None and named[k] != v:
            raise UserError(f"--set {k}={v!r} and --{k.replace('_', '-')} {named[k]!r} disagree: give one")
    cfg = load_config(preset, config, **{**extra, **{k: v for k, v in named.items() if v is not None}})
    if dry_run:
        print_memory_estimate(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
        return
    with _progress("training") as prog:
        def start(total, done):
            task = prog.add_task("", total=total, completed=done)

            def tick(m):
                prog.update(task, advance=1, description=f"loss {m['loss']:.3f} lr {m['lr']:.1e} "
                                                         f"{m['samples_per_s']:.1f} samples/s")
            return tick

        final = run_training(cfg, log=console.print, progress=start)
    if publish:
        from moonsearch.trainer.loop import publish_moon_mini

        console.print(f"moon-mini's weights are now {publish_moon_mini(final)}")


def print_memory_estimate(cfg, world: int) -> None:
    from rich.table import Table

    from moonsearch.trainer.memory import estimate

    at_least("--world", world)
    e = estimate(cfg, world)
    console.print(f"{cfg.model} ({cfg.strategy}, {world} rank(s)): backbone {e.params_backbone / 1e9:.2f}B, "
                  f"MoE experts {e.params_experts / 1e9:.3f}B, trainable {e.params_trainable / 1e6:.1f}M parameters; "
                  f"micro-batch {e.micro_batch} queries, ~{e.seq_len} tokens per product", highlight=False)
    t = Table(title="memory per rank (estimate)")
    t.add_column("part")
    t.add_column("GB", justify="right")
    for k, v in e.gb.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{e.total_gb:.1f}")
    console.print(t)


@app.command("fit-visual")
@friendly
def fit_visual(
    split: Annotated[str, typer.Option(help="real-artwork split to fit on (never 'eval', the held-out one)")] = "fit",
    dim: Annotated[int, typer.Option(help="whitened dimensions")] = 256,
    shrink: Annotated[float, typer.Option(help="eigenvalue shrinkage toward the mean (0: plain whitening)")] = 1.0,
):
    """Refit the visual block's whitening (the packaged transform both offline models use; ~3 minutes)."""
    from moonsearch.models.visual import fit_packaged

    at_least("--dim", dim, 8)
    console.print(f"saved {fit_packaged(split=split, dim=dim, shrink=shrink, log=console.print)}")


@app.command("fit-detector")
@friendly
def fit_detector(
    n: Annotated[int, typer.Option(help="training photos")] = 3000,
    epochs: Annotated[int, typer.Option()] = 60,
):
    """Rebuild the core-product detector's box head (about 2 minutes on 2 CPU cores)."""
    from moonsearch.vision.detector import fit

    at_least("--n", n, 16), at_least("--epochs", epochs)
    console.print(f"saved {fit(n=n, epochs=epochs, log=console.print)}")


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option(help="work folder")] = Path("demo"),
    n: Annotated[int, typer.Option(help="products in the demo world")] = 2000,
    model: Annotated[str, typer.Option(help="encoder")] = "moon-mini",
):
    """The quick start's main job: demo world -> index -> a text, an image and a product query."""
    import pyarrow.parquet as pq

    from moonsearch.data.images import load_image
    from moonsearch.search.service import SearchService

    if not (out / "behavior.parquet").exists():
        demo_data(out=out, n=n, seed=0, vectors_only=False, dim=256, image_size=160, workers=None)
    idx = out / "index"
    index(out / "catalog.parquet", out=idx, model=model, level=None, append=False, nprobe=None, rerank=None,
          bytes_per_vector=None, batch_size=32, device=None)
    svc = SearchService(idx)
    res = svc.search("red sneakers", k=5)  # what `moonsearch query` does: hybrid + query understanding
    understood = ", ".join(f"{k}={v}" for k, v in res.understood.items()) or "nothing"
    print_hits(res.hits, f"'red sneakers' ({res.mode}; understood {understood})")
    beh = pq.read_table(out / "behavior.parquet").to_pylist()
    q = next(b for b in beh if b["split"] == "test" and b["query_image"])
    hits = svc.search_image(load_image(q["query_image"], out), k=5)
    print_hits(hits, f"photo {q['query_image']} (bought {q['item_id']})")
    print_hits(svc.search_product(q["item_id"], k=5), f"products like {q['item_id']}")


@bench_app.command("recall")
@friendly
def bench_recall(
    data: Annotated[Path, typer.Option(help="folder with catalog.parquet + behavior.parquet")] = Path("demo"),
    index_dir: Annotated[Optional[Path], typer.Option("--index", help="index folder (default: <data>/index)")] = None,
    out: Annotated[Path, typer.Option(help="where JSON, markdown and PNG go")] = Path("bench-out"),
    split: Annotated[str, typer.Option(help="behaviour split to evaluate")] = "test",
    route: Annotated[Optional[list[int]], typer.Option(help="category routing R (repeatable; 0 = none)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="evaluate only the first N queries")] = None,
    name: Annotated[str, typer.Option(help="report file name stem")] = "recall",
    mode: Annotated[Optional[list[str]], typer.Option(help="search mode (repeatable): vector, lexical, hybrid; "
                                                      "'+u' adds query understanding, e.g. hybrid+u")] = None,
    fusion: Annotated[str, typer.Option(help="hybrid fusion: default (convex, alpha 0.6), rrf, or convex:ALPHA")] = "default",
    titles: Annotated[int, typer.Option(help="catalog titles asked as exact-title queries")] = 300,
):
    """Recall@1/5/10/50 and MRR@10 per query modality, top-level category, attribute-bearing text and
    exact titles, per search mode (JSON + markdown + PNG)."""
    from moonsearch.eval import recall_bench
    from moonsearch.search.service import SearchService

    for r in route or []:
        at_least("--route", r, 0)
    at_least("--limit", limit)

    from moonsearch.errors import UserError
    from moonsearch.search.service import MODES

    modes = []
    for m in mode or ["vector"]:
        base, _, u = m.partition("+")
        if base not in MODES or u not in ("", "u"):
            raise UserError(f"--mode {m}: expected vector, lexical or hybrid, optionally with '+u'")
        modes.append((base, u == "u"))
    svc = SearchService(index_dir or data / "index")
    if fusion == "rrf":
        svc.fusion = "rrf"
    elif fusion != "default":
        kind, _, a = fusion.partition(":")
        try:
            alpha = float(a)
        except ValueError:
            alpha = -1.0
        if kind != "convex" or not 0 <= alpha <= 1:
            raise UserError(f"--fusion {fusion}: expected rrf or convex:ALPHA with ALPHA in 0..1")
        svc.fusion, svc.alpha = "convex", alpha
    results = []
    for r in route or [0]:
        for m, u in modes:
            with _progress(f"queries ({m}{'+u' if u else ''}, route {r or 'off'})") as prog:
                results.append(recall_bench.run(svc, data, split, route=r or None, limit=limit, mode=m,
                                                understand=u, titles=titles, progress=_with_progress(prog)))
    paths = recall_bench.write(results, out, name)
    console.print(recall_bench.markdown(results), highlight=False, markup=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


@bench_app.command("index")
@friendly
def bench_index(
    sizes: Annotated[list[int], typer.Option("--size", help="catalog sizes (vectors-only world)")] = [10_000, 100_000],
    dim: Annotated[int, typer.Option(help="vector dimension")] = 256,
    out: Annotated[Path, typer.Option(help="where JSON and markdown go")] = Path("bench-out"),
    only_shared: Annotated[bool, typer.Option(help="the shared-quantizer layout alone")] = False,
):
    """The shared-quantizer layout and per-category IVF-PQ vs exact search, a single flat and a single
    global IVF-PQ index."""
    from moonsearch.eval import index_bench

    for n in sizes:
        at_least("--size", n, 1000)
    at_least("--dim", dim, 8)
    index_bench.main(sizes, dim, out, log=console.print, only_shared=only_shared)


@bench_app.command("zero-shot")
@friendly
def bench_zero_shot(
    model: Annotated[list[str], typer.Option(help="encoders to compare (repeatable)")] = ["clip-mini"],
    data: Annotated[Path, typer.Option(help="catalog.parquet (+ behavior.parquet) folder")] = Path("demo"),
    limit: Annotated[int, typer.Option(help="catalog products evaluated (those bought in the test split first)")] = 400,
    out: Annotated[Path, typer.Option(help="where JSON, markdown and PNG go")] = Path("bench-out"),
    name: Annotated[str, typer.Option(help="report file name stem")] = "zero-shot",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of the table")] = False,
):
    """The paper's zero-shot tasks (retrieval, classification, attribute prediction), models side by side."""
    from moonsearch.eval import zero_shot
    from moonsearch.models.base import create_encoder

    at_least("--limit", limit)

    results = [zero_shot.evaluate(create_encoder(m), data, limit=limit) for m in model]
    zero_shot.write(results, out, name)
    if as_json:
        print(json.dumps(results, indent=1))
    else:
        console.print(zero_shot.table(results), highlight=False, markup=False)


@bench_app.command("real")
@friendly
def bench_real(
    model: Annotated[list[str], typer.Option(help="encoders to compare (repeatable)")] = ["clip-mini", "moon-mini"],
    split: Annotated[str, typer.Option(help="eval (held out: nothing is fitted on it) or fit")] = "eval",
    limit: Annotated[Optional[int], typer.Option(help="at most this many products (paired ones first)")] = None,
    out: Annotated[Path, typer.Option(help="where JSON, markdown and PNG go")] = Path("bench-out"),
    name: Annotated[str, typer.Option(help="report file name stem")] = "real",
):
    """Held-out real artwork (icon vendors from npm, split by source): text, image and text+image
    recall@k with products given clean picture + listing photo, listing photo only, clean only, no photos."""
    from moonsearch.data import real
    from moonsearch.eval import real_bench
    from moonsearch.models.base import create_encoder

    from moonsearch.errors import UserError

    at_least("--limit", limit)
    if split not in real.splits():
        raise UserError(f"--split: {split!r} is not one of {', '.join(real.splits())}")
    with console.status(f"drawing the {split} split's artwork"):
        data = real.build(split, max_products=limit)
    results = []
    for m in model:
        with console.status(f"{m}: encoding {len(data.item_ids)} products x 4 variants, {len(data.queries)} queries"):
            results.append(real_bench.evaluate(create_encoder(m), data))
    paths = real_bench.write(results, out, name)
    console.print(real_bench.markdown(results), highlight=False, markup=False)
    for r in results:
        for v, c in r.get("text_rank_change", {}).items():
            console.print(f"{r['model']}: {v}: {c['worse']} of {c['n']} products rank worse for their own name "
                          f"than without photos, {c['better']} better", highlight=False)
    console.print("wrote " + ", ".join(map(str, paths)), highlight=False)


@app.command("convert-mbe")
@friendly
def convert_mbe(
    src: Annotated[Path, typer.Argument(help="local MBE parquet or JSON-lines file")],
    out: Annotated[Path, typer.Option(help="output folder for catalog.parquet")] = Path("mbe"),
):
    """Convert a local copy of the MBE benchmark (Daoze/MM-Bench-E-Commerce) to a moonsearch catalog."""
    from moonsearch.data.mbe import convert

    console.print(f"wrote {convert(src, out)}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
