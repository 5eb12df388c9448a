"""The predictor survives a long day: a soak of sequential predictions cycling through trained weights and none,
with bad URLs, corrupt tars and cancelled loads interleaved; and the real Cog server facing two requests at once.

The soak (``SOAK_REQUESTS``, default 300, 64x64, one inference step) checks after every request that the cache
holds to its byte budget, never evicts the weights being loaded, leaves no partial files, and that the UNet holds
exactly the adapters the weights manager knows of; every good request's image must equal the image that a newly
set-up predictor in a separate process returns for the same weights. The resident set size is measured after a
warm-up round and at the end, and printed with the counts:
``.venv/bin/python -m pytest -q -s tests/test_reliability_predictor.py``.
"""

from __future__ import annotations

import base64
import gzip
import inspect
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save

from pti.inference import weights_cache
from cog_server import CogServer, decode_data_uri
from exactness import assert_images_close, images_differ
from misbehaving_server import MisbehavingServer
from threads import TORCH_THREADS
from predict import Predictor
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread, as the references)
from weights_fixtures import tiny_unet, write_cog_sdxl_tar, write_trained_tar

pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")  # LRU adapter eviction

ROOT = Path(__file__).resolve().parents[1]
SOAK_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "300"))
MAX_LOADED_ADAPTERS = 2
RSS_GROWTH_BOUND = 64 * 1024**2  # after warm-up (measured: +5 MiB over 300 requests)
FAST = dict(width=64, height=64, num_inference_steps=1, seed=11, output_format="png", prompt="a photo of TOK",
            apply_watermark=False)
PREDICT_DEFAULTS = {name: param.default.default for name, param in inspect.signature(Predictor.predict).parameters.items()
                    if name != "self"}

# One process, a newly set-up Predictor per weights (Cog's COG_WEIGHTS path), one prediction each.
REFERENCES = textwrap.dedent("""
    import inspect, json, sys
    import numpy as np, torch
    from PIL import Image
    torch.set_num_threads({threads})
    sys.path.insert(0, {root!r})
    from predict import Predictor
    sources, args, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    defaults = {{k: p.default.default for k, p in inspect.signature(Predictor.predict).parameters.items() if k != "self"}}
    for name, (weights, extras) in sources.items():
        predictor = Predictor()
        predictor.setup(weights)
        (path,) = predictor.predict(**{{**defaults, **args, **extras}})
        np.save(f"{{out}}/{{name}}.npy", np.array(Image.open(path)))
""")


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tars")
    unet = tiny_unet()
    found = {"a": write_trained_tar(folder, 1, unet), "b": write_trained_tar(folder, 2, unet),
             "c": write_trained_tar(folder, 3, unet), "cog": write_cog_sdxl_tar(folder, 4, unet)}
    found["a_gz"] = folder / "trained_model_1.tar.gz"
    found["a_gz"].write_bytes(gzip.compress(found["a"].read_bytes()))
    found.update(_bad_tars(folder, found["a"]))
    return found


def _bad_tars(folder: Path, good: Path) -> dict[str, Path]:
    """Corrupt and unusable tars: truncated, not a tar, garbage safetensors, embeddings of another base model."""
    bad = {"truncated": folder / "truncated.tar", "not_a_tar": folder / "notes.tar",
           "garbage_lora": folder / "garbage_lora.tar", "other_base": folder / "other_base.tar"}
    bad["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    bad["not_a_tar"].write_text("not a tar at all\n" * 64)
    with tarfile.open(good) as source:
        members = {m.name: source.extractfile(m).read() for m in source.getmembers() if m.isfile()}
    wide = save({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})  # the real SDXL's widths
    for name, replaced in (("garbage_lora", {"pytorch_lora_weights.safetensors": os.urandom(4096)}),
                           ("other_base", {"embeddings.safetensors": wide})):
        with tarfile.open(bad[name], "w") as tar:
            for member, data in {**members, **replaced}.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return bad


def data_uri(path: Path, tag: str = "") -> str:
    """A data: URI of a file; ``tag`` makes a distinct source (cache key) for the same bytes."""
    media = "application/x-tar" + (f";name={tag}" if tag else "")
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(tars):
    with MisbehavingServer(next(iter(tars.values())).parent, stall_s=3.0) as running:
        yield running


@pytest.fixture(scope="module")
def references(tars, tmp_path_factory):
    """Reference images per weights, computed in a separate process started now (collected on first use)."""
    out = tmp_path_factory.mktemp("references")
    sources = {"none": (None, {}), **{name: (str(tars[name]), {}) for name in ("a", "b", "c", "cog")}}
    sources.update({name: (str(tars[weights]), dict(extra_lora=[str(tars[e]) for e in extras],
                                                    extra_lora_scale=list(scales)))
                    for name, (weights, extras, scales) in MULTI_LORA.items()})
    env = {**os.environ, "WEIGHTS_CACHE_DIR": str(out / "cache")}
    script = REFERENCES.format(root=str(ROOT), threads=TORCH_THREADS)
    process = subprocess.Popen([sys.executable, "-c", script, json.dumps(sources),
                                json.dumps(FAST), str(out)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    collected: dict[str, np.ndarray] = {}

    def collect() -> dict[str, np.ndarray]:
        if not collected:
            _, stderr = process.communicate(timeout=900)
            assert process.returncode == 0, stderr.decode()[-3000:]
            collected.update({name: np.load(out / f"{name}.npy") for name in sources})
        return collected

    yield collect
    if process.poll() is None:
        process.kill()
        process.wait()


# Several LoRAs at once: reference name -> (replicate_weights, extra_lora, extra_lora_scale); at most
# MAX_LOADED_ADAPTERS sets per request.
MULTI_LORA = {"a+b": ("a", ("b",), (0.5,)), "c+cog": ("c", ("cog",), (1.2,))}


@dataclass(frozen=True)
class Request:
    kind: str  # good | bad | cancel
    name: str
    source: str | None
    reference: str | None = None  # for good requests: which reference image it must equal
    message: str | None = None  # for bad requests: the refusal it must get (a regular expression)
    extra_lora: tuple[str, ...] = ()
    extra_lora_scale: tuple[float, ...] = (1.0,)


def good_sources(tars: dict[str, Path], server: MisbehavingServer) -> list[Request]:
    return [Request("good", "none", None, "none"),
            Request("good", "a by path", str(tars["a"]), "a"),
            Request("good", "a as .tar.gz by URL", server.url("files/" + tars["a_gz"].name), "a"),
            Request("good", "b by URL", server.url("files/" + tars["b"].name), "b"),
            Request("good", "b by URL, dropped once and resumed", server.url("drop-once/" + tars["b"].name), "b"),
            Request("good", "c by data: URI", data_uri(tars["c"]), "c"),
            Request("good", "cog-sdxl layout by path", str(tars["cog"]), "cog"),
            Request("good", "a by path + b by URL at 0.5", str(tars["a"]), "a+b",
                    extra_lora=(server.url("files/" + tars["b"].name),), extra_lora_scale=(0.5,)),
            Request("good", "c by data: URI + cog-sdxl by path at 1.2", data_uri(tars["c"]), "c+cog",
                    extra_lora=(str(tars["cog"]),), extra_lora_scale=(1.2,))]


def bad_sources(tars: dict[str, Path], server: MisbehavingServer) -> list[Request]:
    urls = {"404": ("files/missing.tar", "HTTP 404"),
            "HTML page": ("html", "server sent an HTML page"),
            "HTML labelled tar": ("html-as-tar", "server sent an HTML page"),
            "redirect loop": ("loop", r"more than \d+ redirects"),
            "short body": ("short/" + tars["b"].name, r"download failed after \d+ attempts")}
    requests_ = [Request("bad", f"URL: {name}", server.url(path), message=message)
                 for name, (path, message) in urls.items()]
    tar_messages = {"truncated": "not a valid trained-weights tar", "not_a_tar": "not a valid trained-weights tar",
                    "garbage_lora": "is not a readable safetensors file",
                    "other_base": "clip_l embeddings have shape .* another base model"}
    requests_ += [Request("bad", f"tar: {name}", str(tars[name]), message=message)
                  for name, message in tar_messages.items()]
    requests_ += [Request("bad", "connection refused", "http://127.0.0.1:9/weights.tar", message="download failed"),
                  Request("bad", "bad data: URI", "data:application/x-tar;base64,@@not base64@@",
                          message="payload is not valid base64"),
                  Request("bad", "missing path", str(tars["a"].parent / "missing.tar"),
                          message="no such file or folder"),
                  Request("bad", "a + an extra LoRA that is not there", str(tars["a"]),
                          message=r"^extra_lora\[0\]: .*HTTP 404", extra_lora=(server.url("files/missing.tar"),)),
                  Request("bad", "more weights than the predictor loads at once", str(tars["a"]),
                          message=r"^extra_lora\[1\]: 3 sets of weights at once",
                          extra_lora=(str(tars["b"]), str(tars["c"])))]
    return requests_


def _interrupt_after_the_first_bytes():
    """KeyboardInterrupt (what a cancelled prediction raises) right after the first bytes of the body arrive: the
    download has started and has not ended. Returns the undo."""
    chunks = weights_cache._chunks

    def first_bytes_then_interrupt(response):
        for chunk in chunks(response):
            yield chunk
            raise KeyboardInterrupt

    weights_cache._chunks = first_bytes_then_interrupt
    return lambda: setattr(weights_cache, "_chunks", chunks)


CANCEL_POINTS = ("after extraction", "after the adapter loaded", "after the tokens were set", "during download",
                 "during generation")


class Soak:
    """Runs the requests on one predictor and checks the invariants after each."""

    def __init__(self, predictor: Predictor, budget: int, server: MisbehavingServer, tars: dict[str, Path]):
        self.predictor = predictor
        self.manager = predictor.weights
        self.cache = predictor.weights.cache
        self.budget = budget
        self.server = server
        self.tars = tars
        self.images: list[tuple[str, str, np.ndarray]] = []  # (request name, reference, image)
        self.outcomes: Counter = Counter()
        self.cancel_count = 0
        self.max_cache_bytes_seen = 0
        self._watch_evictions()

    def _watch_evictions(self) -> None:
        make_room = self.cache.make_room

        def make_room_keeping_pinned(incoming_bytes: int) -> None:
            pinned_before = {e.key for e in self.cache.entries() if e.key in self.cache.pinned}
            make_room(incoming_bytes)
            survivors = {e.key for e in self.cache.entries()}
            assert pinned_before <= survivors, f"evicted weights in use: {pinned_before - survivors}"

        self.cache.make_room = make_room_keeping_pinned

    def predict(self, source: str | None, request: Request | None = None) -> np.ndarray:
        extras = dict(extra_lora=list(request.extra_lora), extra_lora_scale=list(request.extra_lora_scale)) \
            if request is not None and request.extra_lora else {}
        (path,) = self.predictor.predict(**{**PREDICT_DEFAULTS, **FAST, "replicate_weights": source, **extras})
        return np.array(Image.open(path))

    def run(self, request: Request) -> None:
        if request.kind == "good":
            self.images.append((request.name, request.reference, self.predict(request.source, request)))
            self.outcomes["good: image returned"] += 1
        elif request.kind == "bad":
            self._expect_refusal(request)
        else:
            self._cancel(request.name)
        self.check_invariants()

    def _expect_refusal(self, request: Request) -> None:
        key = _key_or_none(request.extra_lora[-1] if request.extra_lora else request.source)  # the refused one
        with pytest.raises(ValueError, match=request.message) as error:
            self.predict(request.source, request)
        message = str(error.value)
        assert "\n" not in message and len(message) < 400, f"{request.name}: {message!r}"
        assert key is None or not (self.cache.root / key).exists(), f"{request.name} left a cache entry"
        self.outcomes[f"refused: {type(error.value).__name__}"] += 1

    def _cancel(self, point: str) -> None:
        """Interrupt a load with KeyboardInterrupt (what a cancelled prediction raises) at ``point``."""
        self.cancel_count += 1
        source = data_uri(self.tars["abc"[self.cancel_count % 3]], tag=f"cancel{self.cancel_count}")
        if point == "during download":
            source = self.server.url(f"stall/{self.tars['b'].name}?n={self.cancel_count}")
        undo = self._inject_interrupt(point)
        try:
            with pytest.raises(KeyboardInterrupt):
                self.predict(source)
        finally:
            undo()
        self.outcomes[f"cancelled {point}"] += 1
        if point != "during generation":  # (a cancelled generation leaves its fully loaded weights active)
            live = self.manager.live
            assert live.active is None and self.manager.active is None, "a cancelled load leaves the base active"
            assert [len(t) for t in self.manager.tokenizers()] == list(live.tokens.base_vocab.values())

    def _inject_interrupt(self, point: str):
        live = self.manager.live
        if point == "during download":
            return _interrupt_after_the_first_bytes()
        if point == "during generation":
            def interrupt(module, args):
                raise KeyboardInterrupt

            return live.unet.register_forward_pre_hook(interrupt).remove
        targets = {"after extraction": (weights_cache, "safe_extract"),
                   "after the adapter loaded": (live.unet, "load_lora_adapter"),
                   "after the tokens were set": (live.tokens, "activate")}
        owner, name = targets[point]
        original = getattr(owner, name)

        def run_then_interrupt(*args, **kwargs):
            original(*args, **kwargs)
            raise KeyboardInterrupt

        setattr(owner, name, run_then_interrupt)
        return lambda: setattr(owner, name, original) if owner is weights_cache else delattr(owner, name)

    def check_invariants(self) -> None:
        total = self.cache.total_bytes()
        self.max_cache_bytes_seen = max(self.max_cache_bytes_seen, total)
        assert total <= self.budget, f"cache holds {total} bytes, over its {self.budget} byte budget"
        assert [p.name for p in self.cache.root.iterdir() if p.name.startswith(".")] == [], "partial files left"
        live = self.manager.live
        assert len(live.loaded) <= MAX_LOADED_ADAPTERS
        known = {entry.adapter for entry in live.loaded.values() if entry.adapter}
        assert set(getattr(live.unet, "peft_config", {}) or {}) == known, "the UNet holds adapters nobody tracks"


def _key_or_none(source: str) -> str | None:
    try:
        return weights_cache.cache_key(source)
    except OSError:
        return None


def soak_plan(goods: list[Request], bads: list[Request], count: int) -> list[Request]:
    """A fixed pseudo-random order: about 70% good requests, 18% refusals, 12% cancelled loads."""
    rng = random.Random(2026)
    plan = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.70:
            plan.append(rng.choice(goods))
        elif roll < 0.88:
            plan.append(rng.choice(bads))
        else:
            plan.append(Request("cancel", rng.choice(CANCEL_POINTS), None))
    return plan


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, tars, monkeypatch_module):
    entry_bytes = max(weights_cache._folder_bytes(_extracted(tars[name], tmp_path_factory)) for name in ("a", "b"))
    budget = int(entry_bytes * 2.5)
    monkeypatch_module.setenv("WEIGHTS_CACHE_DIR", str(tmp_path_factory.mktemp("soak-cache")))
    monkeypatch_module.setenv("WEIGHTS_CACHE_MAX_BYTES", str(budget))
    monkeypatch_module.setenv("WEIGHTS_CACHE_MIN_FREE_BYTES", "0")
    monkeypatch_module.setenv("WEIGHTS_MAX_LOADED_ADAPTERS", str(MAX_LOADED_ADAPTERS))
    predictor = Predictor()
    predictor.setup()
    predictor.budget = budget
    return predictor


def _extracted(tar: Path, tmp_path_factory) -> Path:
    from pti.preprocessing import safe_archive
    folder = tmp_path_factory.mktemp("probe") / "x"
    safe_archive.safe_extract(tar, folder)
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_soak_hundreds_of_predictions_with_faults_interleaved(predictor, tars, server, references):
    goods, bads = good_sources(tars, server), bad_sources(tars, server)
    soak = Soak(predictor, predictor.budget, server, tars)
    rss_before_warmup = rss_bytes()
    started = time.perf_counter()
    for request in goods + bads + [Request("cancel", point, None) for point in CANCEL_POINTS]:  # warm-up round
        soak.run(request)
    rss_start = rss_bytes()
    plan = soak_plan(goods, bads, SOAK_REQUESTS)
    for request in plan:
        soak.run(request)
    rss_end = rss_bytes()
    seconds = time.perf_counter() - started
    output_files = [p for p in predictor.outputs_root.rglob("*") if p.is_file()]

    reference = references()
    mismatches = [name for name, ref, image in soak.images if images_differ(image, reference[ref])]
    distinct = {ref: reference[ref].tobytes() for ref in reference}
    print(f"\nsoak: {len(soak.images) + sum(v for k, v in soak.outcomes.items() if not k.startswith('good'))} "
          f"requests in {seconds:.0f}s ({SOAK_REQUESTS} after a warm-up round of "
          f"{len(goods) + len(bads) + len(CANCEL_POINTS)}): {dict(sorted(soak.outcomes.items()))}; "
          f"images equal (up to kernel-choice noise) to the fresh-process reference: {len(soak.images) - len(mismatches)}/{len(soak.images)}; "
          f"RSS before warm-up {rss_before_warmup / 2**20:.0f} MiB, start {rss_start / 2**20:.0f} MiB, "
          f"end {rss_end / 2**20:.0f} MiB; cache peak {soak.max_cache_bytes_seen} of {predictor.budget} bytes; "
          f"output files kept: {len(output_files)}")
    assert len(set(distinct.values())) == len(distinct), "the weights give distinct references"
    assert not mismatches, f"{len(mismatches)} good requests differ from a fresh process: {Counter(mismatches)}"
    assert rss_end - rss_start < RSS_GROWTH_BOUND, f"RSS grew {(rss_end - rss_start) / 2**20:.0f} MiB"
    assert soak.max_cache_bytes_seen > predictor.budget // 2, "the budget was exercised"
    assert len(output_files) <= 1, f"{len(output_files)} output files kept after {len(soak.images)} predictions"


# ------------------------------------------------------------------------------------------ the Cog server


@pytest.fixture(scope="module")
def cog_predict_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("cog-predict")
    env = {"SDXL_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "WEIGHTS_CACHE_DIR": str(work / "cache"),
           "OMP_NUM_THREADS": str(TORCH_THREADS)}  # the torch thread count of the reference process
    server = CogServer(ROOT, "predict", env, work / "server.log").start()
    try:
        server.wait_ready(300)
        yield server
    finally:
        server.stop()


def _post(server: CogServer, weights: str) -> requests.Response:
    return requests.post(f"{server.url}/predictions", json={"input": {**FAST, "replicate_weights": weights}},
                         timeout=300)


def _image(response: requests.Response) -> np.ndarray:
    result = response.json()
    assert result["status"] == "succeeded", result.get("error")
    (uri,) = result["output"]
    return np.array(Image.open(io.BytesIO(decode_data_uri(uri))))


def test_two_requests_at_once_queue_or_are_refused_and_neither_gets_the_others_weights(
        cog_predict_server, tars, server, references):
    """A's weights come from a slow server, so A holds the only slot when B arrives."""
    slow_a, b = server.url("slow/" + tars["a"].name), server.url("files/" + tars["b"].name)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, cog_predict_server, slow_a)
        time.sleep(1.0)
        second = pool.submit(_post, cog_predict_server, b)
        responses = {"a": first.result(), "b": second.result()}
    assert responses["a"].status_code == 200, responses["a"].text
    assert responses["b"].status_code in (200, 409), responses["b"].text
    print(f"\ntwo requests at once: A {responses['a'].status_code}, B {responses['b'].status_code} "
          f"({'queued' if responses['b'].status_code == 200 else 'refused while A ran, then served'})")
    if responses["b"].status_code == 409:  # refused cleanly while A ran: it is served once the slot is free
        responses["b"] = cog_predict_server.post("/predictions", {"input": {**FAST, "replicate_weights": b}})
    reference = references()
    assert_images_close(_image(responses["a"]), reference["a"])
    assert_images_close(_image(responses["b"]), reference["b"])
    cog_predict_server.wait_ready(60)  # Cog frees its slot just after answering: READY again, not at once
