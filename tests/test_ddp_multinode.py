"""``torchrun --nnodes 2`` across two network namespaces: DDP with gloo between "hosts", as docs/multihost.md says.

Each namespace runs ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr <host 1>`` on
``avloc train`` with a tiny config; the rendezvous (TCPStore) and gloo's collectives go over the veth pair, with
``GLOO_SOCKET_IFNAME`` naming it (otherwise gloo picks the address the hostname resolves to, which is loopback
or a device the other host cannot reach). The run directory is shared, as on a cluster's shared filesystem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from netns_helpers import hosts, skip_reason

from avloc.core.config import load_config, merge

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = {
    "model": {"width": 4},
    "frontend": {"window_seconds": 0.1},
    "image": {"size": 32},
    "loss": {"positives": ["orig", "aug"]},
    "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "num_workers": 0, "nn_index": None, "seed": 3},
}


@pytest.mark.slow
@pytest.mark.skipif(skip_reason() is not None or not TORCHRUN.exists(), reason=skip_reason() or "no torchrun")
def test_torchrun_two_nodes_over_gloo_across_namespaces(tmp_path):
    from avloc.core.data.synth import make_synth

    data = make_synth(
        tmp_path / "data", seed=2, n_train=16, n_val=4, n_test=4, silent_frac=0.0, image_size=40, clip_seconds=0.5
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(merge(load_config(REPO / "configs" / "ssl_align.yaml"), TINY)))
    out = tmp_path / "run"
    with hosts(2) as pair:
        master = pair[0].address
        procs = []
        for rank, host in enumerate(pair):
            argv = [
                str(TORCHRUN),
                "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                "--master-addr", master, "--master-port", "29531",
                "-m", "avloc", "train", "--config", str(config), "--data", str(data), "--out", str(out),
            ]  # fmt: skip
            env = {**os.environ, "GLOO_SOCKET_IFNAME": host.interface, "OMP_NUM_THREADS": "1"}
            log = open(tmp_path / f"node{rank}.log", "w")  # noqa: SIM115 - handed to the child
            procs.append(subprocess.Popen(host.command(argv), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        try:
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(30)
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert (out / "best.pt").is_file()
