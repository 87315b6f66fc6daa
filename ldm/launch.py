"""The launcher's process count against the config's, checked before anything is built or written.

Lightning takes ranks from the launcher (torchrun's ``RANK``/``WORLD_SIZE``, srun's ``SLURM_PROCID``/
``SLURM_NTASKS``) but the number of processes it expects from ``lightning.trainer.devices`` x ``num_nodes``. When
they disagree the outcome is silent or a hang: ``torchrun --nproc-per-node=8`` with ``devices=1`` starts 8
independent single-process runs that train on the same data and overwrite each other's checkpoints in one run
directory; more devices than launched processes waits for ranks that never come. A launcher environment that is
half set (``RANK`` without torchrun, ``SLURM_NTASKS`` without ``SLURM_PROCID``) is the same mistake in disguise.
:func:`check_launch` turns each of these into one line that says which setting to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ldm.run import count_devices
from ldm.util import ConfigError

#: variables torchrun sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
#: variables srun sets in every task, which Lightning's SLURMEnvironment reads
SRUN_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")
#: what a mismatch would do, by "the config expects one process"
OUTCOME = {True: "every process would train its own copy of the run into the same run directory",
           False: "the processes would wait for ranks that never start, or take wrong ranks"}


@dataclass(frozen=True)
class Launch:
    """How many processes the launcher started.

    Args:
        launcher: "torchrun" or "srun".
        world_size: processes in all.
        per_node: processes per node, None where the launcher does not say.
        nodes: nodes, None where the launcher does not say.
    """

    launcher: str
    world_size: int
    per_node: int | None
    nodes: int | None


def _int(name: str, launcher: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    head = value.split("(")[0].split(",")[0]  # SLURM writes "8(x32)" or "8,8" for uneven layouts
    try:
        return int(head)
    except ValueError:
        raise ConfigError(f"{launcher} environment: {name}={value!r} is not a number; launch with {launcher} "
                          f"(it sets {name}) instead of setting it by hand") from None


def _slurm_batch_only() -> bool:
    """SLURM's job name "bash"/"interactive" tells Lightning to ignore SLURM (an salloc shell, a manual launch)."""
    return os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")


def detect_launch(one_process: bool = False) -> Launch | None:
    """The launch Lightning will see (torchrun first, as Lightning does, then srun); None for a plain process.

    ``one_process``: the config trains on one device. Then SLURM allocation variables without srun's per-task
    ones (``salloc -n1 python main.py``, whose job name is "python", or a shell other than bash) are a plain
    process: Lightning's single-device strategy never reads the SLURM ranks, and the run trains as anywhere else.

    Raises :class:`ConfigError` for a half-set launcher environment, naming the missing variables.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # torch.distributed.is_torchelastic_launched()
        missing = [v for v in TORCHRUN_VARIABLES if os.environ.get(v) is None]
        if missing:
            raise ConfigError(f"torchrun environment incomplete: TORCHELASTIC_RUN_ID is set but {', '.join(missing)} "
                              "not; start main.py with torchrun (README: Launch), or unset TORCHELASTIC_RUN_ID")
        world, per_node = _int("WORLD_SIZE", "torchrun"), _int("LOCAL_WORLD_SIZE", "torchrun")
        nodes = world // per_node if world and per_node and world % per_node == 0 else None
        return Launch("torchrun", world or 1, per_node, nodes)
    if "SLURM_NTASKS" in os.environ and not _slurm_batch_only():
        missing = [v for v in SRUN_VARIABLES if os.environ.get(v) is None]
        if missing and one_process and len(missing) == len(SRUN_VARIABLES):
            return None
        if missing:
            raise ConfigError(f"SLURM environment incomplete: SLURM_NTASKS is set but {', '.join(missing)} not "
                              "(main.py was not started by srun); start it with srun (scripts/slurm/train.sbatch), "
                              "or for a single process outside srun unset SLURM_NTASKS or set "
                              "SLURM_JOB_NAME=interactive")
        return Launch("srun", _int("SLURM_NTASKS", "srun") or 1, _int("SLURM_NTASKS_PER_NODE", "srun"),
                      _int("SLURM_NNODES", "srun"))
    if os.environ.get("RANK") is not None and os.environ.get("LOCAL_RANK") is None:
        # torch.distributed's env:// convention set by hand (or by mpirun/a custom script): Lightning ignores it
        raise ConfigError(f"RANK={os.environ['RANK']} is set but main.py was not started by torchrun or srun, so "
                          "Lightning would ignore it and train as an independent single process; launch with "
                          "torchrun or srun (README: Launch), or unset RANK and WORLD_SIZE")
    return None


def check_launch(devices: int, num_nodes: int) -> Launch | None:
    """Refuse a launch whose process count differs from ``devices`` x ``num_nodes`` (one line, what to set).

    Returns the launch found (None for a plain process, where Lightning starts the local processes itself).
    """
    launch = detect_launch(one_process=devices * num_nodes == 1)
    if launch is None:
        return None
    configured = devices * num_nodes
    per_node = launch.per_node if launch.per_node is not None else devices
    nodes = launch.nodes if launch.nodes is not None else max(1, launch.world_size // max(1, per_node))
    if launch.world_size != configured or per_node != devices or nodes != num_nodes:
        raise ConfigError(
            f"{launch.launcher} started {launch.world_size} process(es) ({per_node} per node x {nodes} node(s)) but "
            f"the config trains with lightning.trainer.devices={devices} x lightning.trainer.num_nodes={num_nodes}"
            f" = {configured}, so {OUTCOME[configured == 1]}; set lightning.trainer.devices={per_node} "
            f"lightning.trainer.num_nodes={nodes}")
    return launch


def global_batch(cfg: DictConfig) -> tuple[int, str]:
    """Samples per optimizer step of a full config (``data``, ``lightning``) and its factors, for the log."""
    tcfg = OmegaConf.select(cfg, "lightning.trainer") or {}
    bs = int(OmegaConf.select(cfg, "data.params.batch_size", default=1) or 1)
    devices = count_devices(tcfg.get("devices", "auto"), tcfg.get("accelerator", "auto"))
    nodes = int(tcfg.get("num_nodes", 1) or 1)
    accumulate = int(tcfg.get("accumulate_grad_batches", 1) or 1)
    return bs * devices * nodes * accumulate, (f"{bs} (batch size) * {devices} (devices) * {nodes} (nodes) * "
                                               f"{accumulate} (accumulate_grad_batches)")
