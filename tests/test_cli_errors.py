"""Every command fails like a tool: a user's mistake is one ``error:`` line on stderr and exit
status 2, a bug keeps its traceback; ``exp=`` works without ``+``; the ``clip-med`` dispatcher.

Each command line runs in a process of its own, as ``python -m <module> <arguments>``. The light
ones (the shard command, the dispatcher's help) are plain subprocesses; the commands that import
torch run in processes forked from one that imported them once (ZYGOTE), which keeps this file
well under a minute. Every error here fires before any training.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clip_med.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "clip_med" / "conf"
TINY_TRAIN = ["source.image_size=32", "source.sizes={train:8,dev:4}", "model.image_size=32", "shards.workers=0",
              "shards.progress=false", "data.loader.batch_size=4", "data.loader.workers=0"]

# name -> (module, arguments, a part of the error line); {tmp} is the test's folder, {notes} a text file there
USER_ERRORS = {
    "train: no MEDPIX_ROOT (exp= without +)": ("clip_med.train", ["exp=medpix"], "MEDPIX_ROOT"),
    "train: misspelt key": ("clip_med.cli.main", ["train", "optim.lrr=1"], "did you mean optim.lr?"),
    "train: text file as resume": ("clip_med.train", ["resume={notes}", "shards.out={tmp}/shards", *TINY_TRAIN],
                                   "is a text file"),
    "train: missing shards": ("clip_med.train", ["data.train_shards={tmp}/missing/train-000000.tar"],
                              "cannot read the manifest"),
    "shard: no MEDPIX_ROOT": ("clip_med.shard", ["source=medpix"], "github.com/CHILab1/MedPix-2.0"),
    "shard: unknown +key": ("clip_med.shard", ["+foo=1"], "unknown config key(s) foo"),
    "shard: unknown option": ("clip_med.cli.main", ["shard", "source=nope"], "Available options in 'source': "),
    "evaluate: text file as checkpoint": ("clip_med.evaluate", ["checkpoint={notes}", "data=synthetic"],
                                          "is a text file"),
    "probe: text file as checkpoint": ("clip_med.probe", ["checkpoint={notes}", "data=synthetic"], "is a text file"),
    "embed: missing shards": ("clip_med.embed", ["checkpoint={notes}", "shards={tmp}/missing", "out={tmp}/emb"],
                              "shard(s) not found"),
    "classify: text file as checkpoint": ("clip_med.classify", ["checkpoint={notes}", "images={notes}"],
                                          "is a text file"),
    "serve: text file as checkpoint": ("clip_med.serve", ["checkpoint={notes}"], "is a text file"),
    "export: text file as checkpoint": ("clip_med.export", ["checkpoint={notes}", "out={tmp}/exported"],
                                        "is a text file"),
    "search: no index": ("clip_med.search", ["index={tmp}/no-index", "text=chest"], "not an embedding folder"),
    "med_mat: no questions": ("clip_med.med_mat", ["checkpoint={notes}"], "give the Med-MAT folder"),
    "benchmark: no suite": ("clip_med.benchmark", ["models=[{notes}]"], "suite"),
    "benchmark: text file as model": ("clip_med.cli.main", ["benchmark", "suite=medpix", "models=[{notes}]",
                                                            "out={tmp}/bench", "sets=[medpix]"], "is a text file"),
}

# A bug in a job: Hydra's traceback, not an error line.
BUG = """
from clip_med.cli.common import command
from clip_med.cli.shard import register

@command("shard", register=register)
def main(cfg):
    raise TypeError("a bug")

main()
"""

EXPERIMENTS = ["medpix", "roco", "pmc_oa"]
# name -> (module, arguments, extra environment): the other command lines
OTHERS = {
    "full error": ("clip_med.shard", ["source=medpix"], {"HYDRA_FULL_ERROR": "1"}),
    "bug": (None, ["-c", BUG, "source=synthetic"], {}),
    "help": ("clip_med.cli.main", ["--help"], {}),
    "no arguments": ("clip_med.cli.main", [], {}),
    "unknown command": ("clip_med.cli.main", ["trian"], {}),
    "job name": ("clip_med.cli.main", ["shard", "source=roco", "--cfg", "hydra"], {}),
    "train --help": ("clip_med.cli.main", ["train", "--help"], {}),
    **{f"{plus}exp={name}": ("clip_med.cli.main", ["train", f"{plus}exp={name}", "--cfg", "job"], {})
       for name in EXPERIMENTS for plus in ("", "+")},
}
LIGHT = {"clip_med.shard", None}  # and the dispatcher's own help, or its shard command
HEAVY_COMMANDS = ["train", "evaluate", "probe", "embed", "search", "serve", "classify", "export", "med_mat",
                  "benchmark"]

# Imports the heavy commands once, then runs each command line (JSON in argv[1]) in a forked child as
# `python -m` would (runpy, as __main__), its stdout and stderr in files; prints {name: [status, out, err]}.
ZYGOTE = """
import importlib, json, os, runpy, sys, traceback

for command in sys.argv[2:]:
    importlib.import_module("clip_med.cli." + command)
results = {}
for index, (name, (module, args, env)) in enumerate(json.loads(sys.argv[1]).items()):
    paths = [f"{index}.out", f"{index}.err"]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, path in zip((1, 2), paths):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.environ.update(env)
        sys.argv = [module, *args]
        status = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else (exc.code is not None)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    results[name] = [status] + [open(path, encoding="utf-8").read() for path in paths]
print(json.dumps(results))
"""


def _is_light(module, args):
    return module in LIGHT or (module == "clip_med.cli.main" and (not args or args[0] in ("shard", "--help", "trian")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command line of this file, run once: name -> subprocess.CompletedProcess."""
    tmp = tmp_path_factory.mktemp("cli")
    notes = tmp / "notes.txt"
    notes.write_text("not a checkpoint\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("MEDPIX_ROOT", "HYDRA_FULL_ERROR", "ROCO_ROOT", "PMC_OA_ROOT")}
    env["PYTHONPATH"] = str(ROOT)

    def fill(arg):
        return arg.replace("{tmp}", str(tmp)).replace("{notes}", str(notes))

    lines = {name: (module, [fill(arg) for arg in args], {}) for name, (module, args, _) in USER_ERRORS.items()}
    lines.update(OTHERS)
    light = {name: line for name, line in lines.items() if _is_light(*line[:2])}
    heavy = {name: line for name, line in lines.items() if name not in light}
    (tmp / "forked").mkdir()

    def run(item):
        name, (module, args, extra) = item
        command = [sys.executable, *(["-m", module] if module else []), *args]
        return name, subprocess.run(command, cwd=tmp, env={**env, **extra}, capture_output=True, text=True,
                                    timeout=240)

    def run_heavy(_):
        done = subprocess.run([sys.executable, "-c", ZYGOTE, json.dumps(heavy), *HEAVY_COMMANDS], cwd=tmp / "forked",
                              env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        return {name: subprocess.CompletedProcess(heavy[name][1], status, out, err)
                for name, (status, out, err) in json.loads(done.stdout.strip().splitlines()[-1]).items()}

    with ThreadPoolExecutor(max_workers=2) as pool:
        forked = pool.submit(run_heavy, None)
        results = dict(pool.map(run, light.items()))
        results.update(forked.result())
    assert set(results) == set(lines)
    return results


@pytest.mark.parametrize("name", list(USER_ERRORS))
def test_a_user_error_is_one_line(runs, name):
    done = runs[name]
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert USER_ERRORS[name][2] in lines[0] and "HYDRA_FULL_ERROR=1" in lines[0]
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr


def test_every_command_has_a_user_error_case():
    assert {args[0] if module == "clip_med.cli.main" else module.rpartition(".")[2]
            for module, args, _ in USER_ERRORS.values()} == set(COMMANDS)


def test_hydra_full_error_shows_the_traceback(runs):
    done = runs["full error"]
    assert done.returncode != 0 and "Traceback" in done.stderr and "MEDPIX_ROOT" in done.stderr


def test_a_bug_keeps_its_traceback(runs):
    done = runs["bug"]
    assert done.returncode == 1 and "Traceback" in done.stderr and "TypeError: a bug" in done.stderr
    assert "error: " not in done.stderr


def test_exp_with_and_without_plus_compose_the_same_config(runs):
    for name in EXPERIMENTS:
        without, with_plus = runs[f"exp={name}"], runs[f"+exp={name}"]
        assert without.returncode == 0 and with_plus.returncode == 0, without.stderr[-3000:] + with_plus.stderr
        assert f"run_name: {name}" in without.stdout and f"  name: {name}\n" in without.stdout
        assert without.stdout == with_plus.stdout


def test_the_dispatcher_lists_the_commands_and_the_config_groups(runs):
    done = runs["help"]
    assert done.returncode == 0, done.stderr
    for name in COMMANDS:
        assert f"\n  {name} " in done.stdout
    for group in ("source", "model", "loss", "data", "exp"):
        options = sorted(path.stem for path in (CONF / group).glob("*.yaml"))
        line = next(line for line in done.stdout.splitlines() if line.startswith(f"  {group} "))
        assert all(option in line for option in options), line
    assert "HYDRA_FULL_ERROR=1" in done.stdout
    bare = runs["no arguments"]
    assert bare.returncode == 2 and bare.stdout == done.stdout


def test_the_dispatcher_refuses_an_unknown_command(runs):
    done = runs["unknown command"]
    assert done.returncode == 2 and done.stderr.startswith("error: unknown command 'trian' (did you mean train?)")
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_dispatcher_shows_a_commands_hydra_help(runs):
    done = runs["train --help"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train is powered by Hydra" in done.stdout and "== Configuration groups ==" in done.stdout
    assert "exp: medpix, medpix_biomedclip, pmc_oa, roco" in done.stdout


def test_the_dispatcher_keeps_the_commands_job_name(runs):
    done = runs["job name"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "    name: shard\n" in done.stdout and "config_name: shard" in done.stdout


def test_every_command_has_a_config_a_module_and_console_scripts():
    assert set(COMMANDS) == {path.stem for path in CONF.glob("*.yaml")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\nclip-med = "clip_med.cli.main:main"\n' in pyproject
    for name in COMMANDS:
        assert (ROOT / "clip_med" / f"{name}.py").is_file() and (ROOT / "clip_med" / "cli" / f"{name}.py").is_file()
        assert f'\nclip-med-{name} = "clip_med.cli.{name}:main"\n' in pyproject
