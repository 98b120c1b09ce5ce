"""The soak (``avloc bench soak``) in 30 seconds: the same code path as the 10-minute run of docs/reliability.md,
with a tiny engine and a faster heartbeat timeout; the report must account for every fault and every gap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from proc_helpers import orphans

from avloc.core.errors import UserError
from avloc.stream.tools import fuzz, soak, soak_plan, soak_report
from avloc.stream.wire import protocol

FAST_CONFIG = """\
heartbeat_timeout_s: 2.0
startup_grace_s: 120.0
restart_backoff_s: 0.1
restart_backoff_max_s: 0.5
max_restarts: 5
restart_window_s: 600.0
stop_timeout_s: 10.0
"""
FLOOD_DEADLINE_S = 2.0 + 1.0  # heartbeat_timeout_s + 1 s: the soak's own rule for a flood (soak._judge_flood)


def test_fuzz_generators_make_what_receivers_must_refuse():
    rng = np.random.default_rng(0)
    messages = fuzz.fuzz_messages(rng, 1000)
    assert len(messages) == 1000
    refused = 0
    for parts in messages:
        try:
            msg = protocol.decode(parts)
        except protocol.ProtocolError:
            refused += 1
            continue
        # the well-formed ones carry arrays no worker accepts (a 2-D frame, a 3x3 spectrogram)
        assert msg.arrays and all(a.shape in ((4, 4), (1, 3, 3)) for a in msg.arrays.values()), msg
    assert refused >= 0.7 * len(messages)
    subs = fuzz.fuzz_subscriptions(rng, 1000)
    assert len(subs) == 1000 and sum(len(s) > protocol.MAX_SUBSCRIPTION_BYTES for s in subs) >= 200


def test_gaps_are_matched_to_fault_windows():
    records = [{"stream": "cam0", "t": i / 10} for i in range(250) if not 100 < i < 140]
    gaps = soak_report.find_gaps(records, 30.0)
    assert [(g["start_s"], g["end_s"]) for g in gaps] == [(10.0, 14.0), (24.9, 30.0)]
    fault = soak_plan.Fault("kill9", "inference", ("inference",), 9.0, injected_s=9.5, ready_s=13.0, resumed_s=14.0)
    windows = soak_report.fault_windows([fault], 30.0)
    assert windows == [{"fault": "kill9 inference", "start_s": 9.5, "end_s": 15.0}]


def test_warming_up_heatmaps_count_as_computed():
    """A restarted replay's first heatmaps carry warming_up: they end its fault like any computed map."""
    notices = [None, protocol.NOTICE_NOT_VISIBLE, protocol.NOTICE_WARMING_UP, protocol.NOTICE_NO_AUDIO, "non_finite"]
    records = [{"stream": "cam0", "t": float(i), "notice": n} for i, n in enumerate(notices)]
    assert [r["notice"] for r in soak.computed_heatmaps(records)] == notices[:3]


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--minutes"):
        soak.run_soak(tmp_path, minutes=0)


@pytest.mark.slow  # 30 s of soak + start-up + the recovery of the last faults: 108 s at nice 15 on 2 busy cores
def test_soak_accounts_for_every_fault_and_gap(engine_and_video, tmp_path):
    engine, clip = engine_and_video  # conftest's: built once per session, read-only here (the camera gets a copy)
    config = tmp_path / "stream.yaml"
    config.write_text(FAST_CONFIG)
    out = tmp_path / "soak"
    report = soak.run_soak(out, minutes=0.5, engine=engine, video=clip, threads=1, config_path=config, seed=1)
    assert json.loads((out / "soak.json").read_text())["summary"] == report["summary"]
    assert "| fault |" in (out / "soak.md").read_text()
    faults = {f"{f['kind']} {f['target']}": f for f in report["faults"]}
    for worker in ("replay", "camera", "display", "inference"):
        for kind in ("kill9", "sigstop"):
            f = faults[f"{kind} {worker}"]
            assert f["injected_s"] is not None and f["ok"], f
            assert f["restarted_after_s"] is not None and f["ready_after_s"] is not None, f
        assert faults[f"sigstop {worker}"]["details"]["why"] == "stopped sending heartbeats"
        assert report["processes"][worker]["restarts"] >= 2
    gone = faults["source_gone camera"]
    assert gone["ok"] and gone["details"]["open_failures"] >= 1, gone
    fuzz = [f for f in report["faults"] if f["kind"] == "fuzz"]
    assert len(fuzz) == 7 and all(f["ok"] and f["details"]["sent"] == 1000 for f in fuzz), fuzz
    assert faults["fuzz inference+display.frames"]["details"]["inference_rejected"] >= 900
    assert faults["fuzz inference.audio"]["details"]["inference_rejected"] >= 900
    assert faults["fuzz launcher.heartbeats"]["details"]["ends_accepted"] == 0
    flood = faults["flood display"]  # SIGSTOP while the launcher's heartbeat socket is flooded (issue 22)
    assert flood["ok"] and flood["details"]["deadline_held"] and flood["details"]["flood_on_at_detection"], flood
    assert flood["details"]["flood_counted"] > 0 and flood["detected_after_s"] <= FLOOD_DEADLINE_S, flood
    assert report["summary"]["faults_detected_and_recovered"] == report["summary"]["faults_planned"] == 17
    assert report["unaccounted_gaps"] == [], report["gaps"]
    assert report["gaps"], "killing the inference worker must leave a gap"
    for stream in ("cam0", "cam1"):
        s = report["streams"][stream]
        # frames_captured sums each publisher incarnation's last heartbeat: a kill -9 loses the frames it sent
        # after that beat (at most one 0.5 s heartbeat interval at 30 fps), so delivered may exceed it by that
        incarnations = report["processes"][s["source"]]["restarts"] + 1
        assert 0 < s["heatmaps_delivered"] <= s["frames_captured"] + 15 * incarnations, s
    assert not orphans(timeout=15)
