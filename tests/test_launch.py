"""launch/ scripts: their --dry-run output is the exact command list, checked argument by argument.

Each printed line is parsed back with shlex (as a shell would) and compared to the argv we expect,
so a quoting mistake in the scripts fails here. The SLURM batch script is also *executed* with
stand-ins for srun/scontrol/prompt-t5x to prove every task gets the right JAX_* variables.
"""

import os
import pathlib
import shlex
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sh"


@pytest.fixture(autouse=True)
def no_real_cloud_tools(tmp_path_factory, monkeypatch):
    """gcloud/sbatch/tar stand-ins that fail loudly: a dry run must never execute anything."""
    bin_dir = tmp_path_factory.mktemp("forbidden")
    for name in ("gcloud", "sbatch", "tar"):
        (bin_dir / name).write_text(f"#!/bin/bash\necho 'dry run executed {name}' >&2\nexit 99\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def run_script(script, *args):
    # --dry-run goes first: after '--' it would belong to the user's command.
    return subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True,
                          text=True, timeout=30)


def dry_run(script, *args):
    proc = run_script(script, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def commands(script, *args):
    return [shlex.split(line) for line in dry_run(script, *args).splitlines() if line.strip()]


GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


@pytest.mark.parametrize("accelerator,zone,version,accelerator_type", [
    ("v3-32", "europe-west4-a", "tpu-ubuntu2204-base", "v3-32"),
    ("v4-32", "us-central2-b", "tpu-ubuntu2204-base", "v4-32"),
    ("v5e-16", "us-west4-a", "v2-alpha-tpuv5-lite", "v5litepod-16"),
    ("v5litepod-8", "us-west4-a", "v2-alpha-tpuv5-lite", "v5litepod-8"),
])
def test_tpu_create_per_generation(accelerator, zone, version, accelerator_type):
    assert commands(TPU, "create", "--name", "pt", "--accelerator", accelerator) == [
        GCLOUD + ["create", "pt", f"--zone={zone}", f"--accelerator-type={accelerator_type}",
                  f"--version={version}"]]


def test_tpu_create_with_project_spot_and_zone_override():
    assert commands(TPU, "create", "--name", "pt", "--accelerator", "v4-8", "--zone",
                    "us-central2-a", "--project", "proj", "--spot") == [
        GCLOUD + ["create", "pt", "--zone=us-central2-a", "--project=proj",
                  "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_tpu_install_copies_checkout_to_all_workers_and_pip_installs():
    tar, scp, ssh = commands(TPU, "install", "--name", "pt", "--accelerator", "v4-32",
                             "--source", "/src/repo")
    assert tar[:1] == ["tar"] and tar[-5:] == ["-czf", "/tmp/prompt_t5x-src.tgz", "-C",
                                               "/src/repo", "."] and "--exclude=.venv" in tar
    assert scp == GCLOUD + ["scp", "/tmp/prompt_t5x-src.tgz", "pt:/tmp/prompt_t5x-src.tgz",
                            "--zone=us-central2-b", "--worker=all"]
    assert ssh[:len(GCLOUD) + 4] == GCLOUD + ["ssh", "pt", "--zone=us-central2-b", "--worker=all"]
    remote = ssh[-1]
    assert remote.startswith("--command=")
    steps = [s.strip() for s in remote[len("--command="):].split("&&")]
    assert steps[:3] == ["mkdir -p ~/prompt_t5x",
                         "tar -xzf /tmp/prompt_t5x-src.tgz -C ~/prompt_t5x", "cd ~/prompt_t5x"]
    assert shlex.split(steps[4]) == ["python3", "-m", "pip", "install", "jax[tpu]>=0.10.2,<0.12"]
    assert shlex.split(steps[5]) == ["python3", "-m", "pip", "install", "-e", ".[data]"]


def test_tpu_run_passes_the_command_to_every_worker_unchanged():
    user = ["prompt-t5x", "train", "--gin_file=gin/models/xxl.gin",
            "--gin.MODEL_DIR='gs://bucket/run 1'", "--mesh=4x4"]
    (ssh,) = commands(TPU, "run", "--name", "pod", "--accelerator", "v4-32", "--", *user)
    assert ssh[:-1] == GCLOUD + ["ssh", "pod", "--zone=us-central2-b", "--worker=all"]
    remote = ssh[-1][len("--command="):]
    prefix = "cd ~/prompt_t5x && export PATH=$HOME/.local/bin:$PATH && "
    assert remote.startswith(prefix)
    assert shlex.split(remote[len(prefix):]) == user


def test_tpu_stop_and_delete():
    assert commands(TPU, "stop", "--name", "pt", "--accelerator", "v3-8") == [
        GCLOUD + ["stop", "pt", "--zone=europe-west4-a"]]
    assert commands(TPU, "delete", "--name", "pt", "--accelerator", "v3-8") == [
        GCLOUD + ["delete", "pt", "--zone=europe-west4-a", "--quiet"]]


@pytest.mark.parametrize("args,message", [
    (["create", "--accelerator", "v9-8"], "is not a v3-N, v4-N or v5litepod-N"),
    (["create", "--accelerator", "v4-big"], "must end in a core/chip count"),
    (["launch"], "unknown command"),
    (["run"], "give the command after '--'"),
    (["create", "--bogus"], "unknown flag"),
])
def test_tpu_bad_input_is_one_clear_error(args, message):
    proc = run_script(TPU, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def _slurm(*extra):
    return dry_run(SLURM, "--nodes", "4", "--gpus_per_node", "8", "--partition", "a100",
                   "--venv", "/opt/venv", "--workdir", "/src/repo", "--script", "/tmp/x.sbatch",
                   *extra)


def test_slurm_dry_run_prints_batch_script_and_sbatch_command():
    out = _slurm("--", "prompt-t5x", "train", "--gin_file=a.gin")
    lines = out.splitlines()
    assert lines[0] == "# batch script (/tmp/x.sbatch):"
    assert lines[-2:] == ["# submit:", "sbatch /tmp/x.sbatch"]
    for directive in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --partition=a100",
                      "cd /src/repo", "source /opt/venv/bin/activate"]:
        assert directive in lines, directive
    srun = next(line for line in lines if line.startswith("srun "))
    # The task command (bash -c '...') spans lines; it is executed in the next test.
    assert shlex.split(srun.split(" bash -c ")[0]) == ["srun", "--nodes=4", "--ntasks-per-node=1",
                                                      "--gpus-per-node=8"]


def test_slurm_batch_script_runs_and_sets_jax_variables_per_task(tmp_path):
    user = ["prompt-t5x", "train", "--gin.MODEL_DIR='/runs/a b'", "--mesh=-1x8"]
    out = dry_run(SLURM, "--nodes", "2", "--workdir", str(tmp_path), "--port", "2222",
                  "--script", str(tmp_path / "job.sbatch"), "--", *user)
    script = "\n".join(out.splitlines()[1:-2])
    # Stand-ins: srun runs its command once as task 1 of 2; scontrol lists many nodes (so a
    # script that cut the list with `head` would die of SIGPIPE under pipefail).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                'SLURM_NTASKS=2 SLURM_PROCID=1 "$@"\n',
        "scontrol": "#!/bin/bash\nfor i in $(seq 7 5000); do echo gpu-node-$i; done\n",
        "prompt-t5x": '#!/bin/bash\necho "$JAX_COORDINATOR_ADDRESS|$JAX_NUM_PROCESSES|'
                      '$JAX_PROCESS_ID"\nfor a in "$@"; do echo "$a"; done\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    (tmp_path / "job.sbatch").write_text(script)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="x")
    proc = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gpu-node-7:2222|2|1"] + user[1:]


@pytest.mark.parametrize("args,message", [
    (["--nodes", "0", "--", "x"], "--nodes must be a positive integer"),
    (["--nodes", "2"], "give the command after '--'"),
    (["--bogus"], "unknown flag"),
])
def test_slurm_bad_input_is_one_clear_error(args, message):
    proc = run_script(SLURM, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


BENCH = ROOT / "launch" / "gpu_bench.sh"
GPU_STAGES = ("env", "xl", "xxl", "xxlpeer", "base", "peer", "ablate")


def gpu_runs(stage, out_dir):
    """[(limit_s, argv)] of a stage: each dry-run line is 'timeout --kill-after=20 N argv...'."""
    runs = []
    for line in commands(BENCH, stage, "--out", str(out_dir)):
        assert line[:2] == ["timeout", "--kill-after=20"], line
        runs.append((int(line[2]), line[3:]))
    return runs


@pytest.mark.parametrize("stage", GPU_STAGES)
def test_gpu_bench_stage_commands_parse_validate_and_fit_one_call(stage, tmp_path):
    """Every run of every stage is a valid bench / peer command line (flags that exist, values
    that pass validation), and a stage's limits plus grace fit one 600 s device call: a GPU
    session must not lose its minutes to a typo or a killed call."""
    from prompt_t5x.bench import bench_protocol, peft_peer
    runs = gpu_runs(stage, tmp_path)
    assert runs, stage
    assert sum(limit + 20 for limit, _ in runs) <= 570, stage
    for _, argv in runs:
        assert argv[:2] == ["python3", "-m"]
        module, rest = argv[2], argv[3:]
        if module == "prompt_t5x":
            assert rest[0] == "bench"
            args = bench_protocol.build_parser().parse_args(rest[1:])
            bench_protocol.validate(args)
        else:
            assert module == "prompt_t5x.bench.peft_peer"
            args = peft_peer.build_parser().parse_args(rest)
            peft_peer.validate(args)
        assert args.json.startswith(str(tmp_path / f"{stage}_")) and args.json.endswith(".json")


def test_gpu_bench_targets_use_the_issue_configuration(tmp_path):
    from prompt_t5x.bench import bench_protocol
    ((_, xl),) = gpu_runs("xl", tmp_path)
    args = bench_protocol.build_parser().parse_args(xl[4:])
    assert (args.size, args.batch, args.encoder_len, args.prompt_len, args.decoder_len) == (
        "xl", 32, 512, 100, 16)
    assert (args.remat, args.attention, args.peer, args.peer_compile) == (
        "dots_no_batch", "cudnn", "peft", True)
    assert args.profile   # traced after timing: the split comes back in the same JSON


@pytest.mark.parametrize("args,message", [
    ((), "STAGE must be one of"),
    (("bogus",), "STAGE must be one of"),
    (("xl", "xxl"), "one STAGE only"),
    (("xl", "--frobnicate"), "unknown flag --frobnicate"),
])
def test_gpu_bench_bad_input_is_one_clear_error(args, message):
    proc = run_script(BENCH, *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
