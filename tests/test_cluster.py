"""Several devices and nodes without a cluster: what a profile's ``trainer`` section resolves to under SLURM,
torchrun and on one machine, the Lightning Trainer that those options build, and the example cluster profile."""
import subprocess

import pytest

from cmr_utils import params as P
from cmr_utils.paths import PROJ_ROOT
from cmr_utils.training import trainer_options

LAUNCHER_VARIABLES = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_PROCID", "SLURM_LOCALID",
                      "SLURM_NODEID", "SLURM_JOB_NAME", "SLURM_NODELIST", "SLURM_JOB_ID", "RANK", "WORLD_SIZE",
                      "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                      "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's variables; and Lightning's process-wide rank (``rank_zero_only.rank``, which a Trainer built
    under faked SLURM ranks sets to 5) restored afterwards, or every later Trainer of the session would think it is
    rank 5 and write no logs."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def srun_task(monkeypatch, nodes=2, per_node=4, rank=5):
    """The variables srun sets for task ``rank`` of ``nodes`` x ``per_node`` (``sbatch --nodes --ntasks-per-node``)."""
    for name, value in {"SLURM_NTASKS": nodes * per_node, "SLURM_NTASKS_PER_NODE": per_node, "SLURM_NNODES": nodes,
                        "SLURM_PROCID": rank, "SLURM_LOCALID": rank % per_node, "SLURM_NODEID": rank // per_node,
                        "SLURM_JOB_NAME": "cmr-ssl", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": 42}.items():
        monkeypatch.setenv(name, str(value))


def cluster_trainer():
    return P.load_profile("paper-cluster")["trainer"]


def test_the_cluster_profile_is_the_paper_protocol_with_another_trainer():
    paper, cluster = P.load_profile("paper"), P.load_profile("paper-cluster")
    assert {k: v for k, v in paper.items() if k != "trainer"} == {k: v for k, v in cluster.items() if k != "trainer"}
    differ = {k for k in paper["trainer"] if paper["trainer"][k] != cluster["trainer"][k]}
    assert differ == {"accelerator", "devices", "num_nodes", "strategy"}


def test_srun_tasks_resolve_to_ddp_on_two_nodes_of_four_devices(no_launcher):
    srun_task(no_launcher)
    options = trainer_options(cluster_trainer())
    assert (options["num_nodes"], options["devices"], options["strategy"]) == (2, 4, "ddp")
    assert options["accelerator"] == "gpu" and options["sync_batchnorm"] is True


def test_the_options_build_a_lightning_trainer_of_eight_processes_in_slurms_ranks(no_launcher):
    """The same geometry on CPU devices (no GPU here): Lightning takes SLURM's environment and ranks, and its own
    check of --ntasks-per-node against ``devices`` passes. Nothing is launched: the process group starts in fit."""
    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import SLURMEnvironment

    srun_task(no_launcher, rank=5)
    options = trainer_options({**cluster_trainer(), "accelerator": "cpu", "precision": "32-true"})
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, **options)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (5, 1, 1)
    assert type(trainer.strategy).__name__ == "DDPStrategy"
    assert trainer.strategy.cluster_environment.creates_processes_externally  # srun started them: nothing forked


def test_torchrun_resolves_the_same_way(no_launcher):
    for name, value in {"RANK": 3, "WORLD_SIZE": 8, "LOCAL_RANK": 3, "LOCAL_WORLD_SIZE": 4, "GROUP_RANK": 0,
                        "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29400}.items():
        no_launcher.setenv(name, str(value))
    options = trainer_options(cluster_trainer())
    assert (options["num_nodes"], options["devices"], options["strategy"]) == (2, 4, "ddp")


def test_a_launch_that_disagrees_with_the_profile_is_an_error(no_launcher):
    srun_task(no_launcher, nodes=1, per_node=8, rank=0)
    with pytest.raises(ValueError, match=r"trainer.num_nodes 2 and trainer.devices 4: slurm started 1 node\(s\) "
                                         r"with 8 process\(es\) each"):
        trainer_options(cluster_trainer())
    srun_task(no_launcher)
    with pytest.raises(ValueError, match="trainer.strategy 'ddp_notebook': slurm already started every process"):
        trainer_options({**cluster_trainer(), "strategy": "ddp_notebook"})


def test_one_machine_forks_from_the_kernel_and_refuses_what_cannot_work_there(no_launcher):
    one_machine = {**cluster_trainer(), "accelerator": "cpu", "num_nodes": 1, "devices": 2, "strategy": "auto"}
    options = trainer_options(one_machine)
    assert (options["num_nodes"], options["devices"], options["strategy"]) == (1, 2, "ddp_notebook")
    assert options["sync_batchnorm"] is False  # torch's SyncBatchNorm runs on GPUs only
    with pytest.raises(ValueError, match="trainer.strategy 'ddp': Lightning would start the other processes"):
        trainer_options({**one_machine, "strategy": "ddp"})
    with pytest.raises(ValueError, match="trainer.num_nodes 2: several nodes need a launcher"):
        trainer_options({**one_machine, "num_nodes": 2})
    single = trainer_options({**one_machine, "devices": 1})
    assert single["strategy"] == "auto" and single["sync_batchnorm"] is False


def test_sbatch_script_is_valid_bash_and_names_the_cluster_profile():
    script = PROJ_ROOT / "tools" / "slurm" / "stage.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    profile = P.load_profile("paper-cluster")["trainer"]
    assert f"#SBATCH --nodes={profile['num_nodes']}" in text
    assert f"#SBATCH --ntasks-per-node={profile['devices']}" in text
    assert "paper-cluster" in text


def test_only_rank_zero_of_a_launched_job_writes_the_notebooks_outputs(no_launcher):
    from cmr_utils.distributed import is_main_process

    assert is_main_process()  # one process, no launcher
    srun_task(no_launcher, rank=5)
    assert not is_main_process()
    srun_task(no_launcher, rank=0)
    assert is_main_process()
    for name in LAUNCHER_VARIABLES:
        no_launcher.delenv(name, raising=False)
    for name, value in {"RANK": 3, "WORLD_SIZE": 8, "LOCAL_RANK": 3, "LOCAL_WORLD_SIZE": 4, "GROUP_RANK": 0,
                        "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29400}.items():
        no_launcher.setenv(name, str(value))
    assert not is_main_process()
    no_launcher.setenv("RANK", "0")
    assert is_main_process()
