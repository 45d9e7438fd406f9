"""Reading shards from anywhere: local patterns, http:// (a server started here), pipe: commands."""

import contextlib
import functools
import http.server
import json
import shutil
import threading

import pytest
import webdataset as wds
from helpers import tiny_train_config

from clip_med.data.shardset import open_shard_lists, open_shard_set, prepare_shards
from clip_med.data.sources.synthetic import SyntheticSourceConfig
from clip_med.data.writer import ShardConfig
from clip_med.training.trainer import train


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shard_set = prepare_shards(SyntheticSourceConfig(image_size=32, sizes={"train": 96, "dev": 32}),
                               ShardConfig(out=str(out), max_samples=24, workers=0, progress=False))
    assert len(shard_set.manifest("train").shards) == 4
    return out


def _count(urls):
    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False))


def test_http_brace_pattern_and_manifest_url(shards):
    with serve(shards) as base:
        by_pattern = open_shard_set(f"{base}/train-{{000000..000003}}.tar")
        assert by_pattern.splits == ["train"]
        assert by_pattern.urls("train") == [f"{base}/train-{i:06d}.tar" for i in range(4)]
        assert sum(by_pattern.shard_counts("train").values()) == 96
        assert _count(by_pattern.urls("train")) == 96  # webdataset's gopen reads them through curl
        by_manifest = open_shard_set(f"{base}/dev.manifest.json")
        assert by_manifest.urls("dev") == [f"{base}/dev-000000.tar", f"{base}/dev-000001.tar"]
        assert by_manifest.shard_counts("dev") == {f"{base}/dev-000000.tar": 24, f"{base}/dev-000001.tar": 8}
        subset = open_shard_set(f"{base}/train-{{000001..000002}}.tar")
        assert sum(subset.shard_counts("train").values()) == 48


def test_pipe_commands_and_local_patterns(shards):
    pipe = open_shard_lists(f"pipe:cat {shards}/train-{{000000..000003}}.tar", f"pipe:cat {shards}/dev.manifest.json")
    assert pipe.urls("dev") == [f"pipe:cat {shards}/dev-000000.tar", f"pipe:cat {shards}/dev-000001.tar"]
    assert _count(pipe.urls("train")) == 96 and pipe.held_out_split("train", None) == "dev"
    local = open_shard_set(f"{shards}/train-{{000000..000003}}.tar")
    assert sum(local.shard_counts("train").values()) == 96


def test_missing_manifest_and_wrong_range_are_clear_errors(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(shards / "train-000000.tar", bare)
    with serve(bare) as base, pytest.raises(FileNotFoundError, match="train.manifest.json"):
        open_shard_set(f"{base}/train-{{000000..000000}}.tar")
    with pytest.raises(ValueError, match="train-000004.tar is not in"):
        open_shard_set(f"{shards}/train-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="names neither shards"):
        open_shard_lists("https://example.invalid/data.tar")


def test_training_reads_shards_over_http(shards, tmp_path):
    cfg = tiny_train_config(tmp_path)
    cfg.trainer.epochs = 1
    cfg.shards.out = str(tmp_path / "never-written")  # the source is not read: the shards come from the server
    with serve(shards) as base:
        cfg.data.train_shards = f"{base}/train-{{000000..000003}}.tar"
        cfg.data.eval_shards = f"{base}/dev.manifest.json"
        report = train(cfg)
    assert report["step"] == 6 and report["split"] == "dev" and report["n_images"] == 32
    assert json.loads((tmp_path / "run" / "report.json").read_text())["retrieval"]
    assert not (tmp_path / "never-written").exists()
