"""Ledger sync's line budget and robustness (docs/sync-protocol.md §6).

Prints the bytes one step costs on the wire (frame, message and protocol overhead), the time a
1,000-step ledger takes over a 115200-baud serial line (computed from the bytes at 10 bits a
byte, and measured through a pseudo-terminal paced like a UART: Linux ptys ignore the line
speed, which this checks and says), TCP loopback throughput, and a large fuzz: corrupted frames
through the decoder (default 10^6) and damaged step payloads through the decoder and the chain
(default 10^5).  No model is needed: the ledger is synthetic, its steps shaped like real ones
(population 16, a real step's timings).

    python benchmarks/bench_sync.py [--steps 1000] [--population 16] [--baud 115200]
                                    [--fuzz 1000000] [--payload-fuzz 100000] [--no-paced]

Writes benchmarks/results/sync.json."""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from qes_edge.ledger.store import Ledger, LedgerError
from qes_edge.sync import Options, serve_session, sync
from qes_edge.sync import messages as M
from qes_edge.sync.frames import OVERHEAD
from qes_edge.sync.messages import MessageError
from qes_edge.sync.testing import PacedLink, check_fuzz, fuzz_decoder, pty_pair, socket_pair, synthetic_ledger


def run_sync(src: Path, dst: Path, links, wrap=None, opts=None):
    a, b = links()
    if wrap is not None:
        a, b = wrap(a), wrap(b)
    opts = opts or Options(timeout=3.0)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=serve_session(a, src, None, opts)[0]), daemon=True)
    t0 = time.perf_counter()
    t.start()
    res = sync(lambda: b, dst, None, opts)
    wall = time.perf_counter() - t0
    t.join(60)
    a.close()
    b.close()
    return res, out["r"], wall


def pty_honours_baud(baud: int = 9600, n: int = 4800) -> tuple[bool, float]:
    """Write n bytes into a pty opened at `baud`: a real line needs n*10/baud seconds."""
    slave, master = pty_pair(baud)
    data = bytes(range(256)) * (n // 256 + 1)
    data = data[:n]
    t0 = time.perf_counter()
    threading.Thread(target=slave.write, args=(data,), daemon=True).start()
    got = b""
    while len(got) < n and time.perf_counter() - t0 < 30:
        got += master.read(0.1)
    dt = time.perf_counter() - t0
    slave.close()
    master.close()
    return dt > 0.5 * n * 10 / baud, dt


def fuzz_payloads(n: int, src: Path, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    lg = Ledger(src, readonly=True)
    run_id = lg.run().run_id
    recs, times, info = list(lg.steps(run_id, 0, 2)), lg.step_times(run_id, 0, 2), lg.export_run(run_id)
    lg.close()
    with tempfile.TemporaryDirectory() as d:
        dst = Ledger(Path(d) / "dst.qes")
        dst.import_run(info)
        dst.append_received(run_id, recs[0], times[0])
        target = M.encode_step(recs[1], times[1])
        out = {"MessageError": 0, "LedgerError": 0, "accepted": 0}
        t0 = time.perf_counter()
        done = 0
        while done < n:
            b = bytearray(target)
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(0, len(b)))
                b[i] ^= 1 << int(rng.integers(0, 8))
            bad = bytes(b)
            if bad[:24] == target[:24] and bad[32:] == target[32:]:
                continue  # only `created` changed: not chained, not training state
            done += 1
            try:
                rec, created = M.decode_step(bad)
                dst.append_received(run_id, rec, created)
                out["accepted"] += 1
            except MessageError:
                out["MessageError"] += 1
            except LedgerError:
                out["LedgerError"] += 1
        ok = dst.verify(run_id) == 1
        dst.close()
    return {"payloads": n, **out, "ledger_intact": ok, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--fuzz", type=int, default=1_000_000, help="corrupted frames through the decoder")
    ap.add_argument("--payload-fuzz", type=int, default=100_000, help="damaged step payloads through the chain")
    ap.add_argument("--no-paced", action="store_true", help="skip the (real-time) paced serial measurement")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sync.json")
    a = ap.parse_args(argv)
    result = {"steps": a.steps, "population": a.population, "baud": a.baud}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        src = d / "src.qes"
        t0 = time.perf_counter()
        run_id = synthetic_ledger(src, a.steps, population=a.population)
        print(f"synthetic ledger: {a.steps} steps, population {a.population} "
              f"({time.perf_counter() - t0:.1f} s to write)")
        lg = Ledger(src, readonly=True)
        rec = lg.last_step(run_id)
        payload = len(M.encode_step(rec, 0.0))
        timings = len(M.canonical_json(rec.timings))
        lg.close()

        # bytes on the wire, TCP loopback (a socket pair)
        res, srv, wall = run_sync(src, d / "tcp.qes", socket_pair)
        assert res.steps == a.steps, res
        down, up = srv.bytes_out, srv.bytes_in
        per_step = down / a.steps
        uart_s = down * 10 / a.baud
        half_duplex_s = (down + up) * 10 / a.baud
        result.update({
            "step_frame_bytes": OVERHEAD + payload, "step_payload_bytes": payload, "timings_bytes": timings,
            "frame_overhead_bytes": OVERHEAD, "session_bytes_down": down, "session_bytes_up": up,
            "bytes_per_step_on_the_wire": round(per_step, 1), "computed_seconds_at_baud": round(uart_s, 1),
            "computed_seconds_half_duplex": round(half_duplex_s, 1),
            "tcp_loopback_seconds": round(wall, 2), "tcp_steps_per_s": round(a.steps / wall)})
        print(f"one step: frame {OVERHEAD + payload} bytes = {OVERHEAD} frame overhead + payload {payload} "
              f"(36 fixed, {20 * a.population} for {a.population} members' seeds, coefficients and rewards, 64 for "
              f"the weights hash and the step hash, {timings} of timings JSON)")
        print(f"a {a.steps}-step sync: {down:,} bytes to the receiver ({per_step:.1f} bytes/step with hello, "
              f"requests' answers, done and bye), {up:,} bytes back (requests)")
        print(f"at {a.baud} baud (10 bits a byte): {uart_s:.1f} s computed for {a.steps} steps "
              f"({half_duplex_s:.1f} s if the line were half duplex); TCP loopback: {wall:.2f} s "
              f"({a.steps / wall:,.0f} steps/s)")

        honours, dt = pty_honours_baud()
        result["pty_honours_baud"] = honours
        print(f"pseudo-terminal at 9600 baud: 4800 bytes in {dt * 1000:.0f} ms "
              f"({'honours' if honours else 'ignores'} the line speed; a real line needs 5000 ms)")
        if not a.no_paced:
            res, srv, wall = run_sync(src, d / "serial.qes", lambda: pty_pair(a.baud),
                                      wrap=lambda link: PacedLink(link, a.baud))
            assert res.steps == a.steps, res
            result["measured_seconds_paced_pty"] = round(wall, 1)
            print(f"measured through a pty paced at {a.baud} baud (10 bits a byte, both directions): {wall:.1f} s for "
                  f"{a.steps} steps ({a.steps / wall:.1f} steps/s)")

        if a.fuzz:
            fz = fuzz_decoder(a.fuzz)
            result["decoder_fuzz"] = fz
            print(f"decoder fuzz: {fz['corrupted_frames']:,} corrupted frames ({len(fz['kinds'])} kinds), each before "
                  f"an intact one: {fz['wrong']} damaged frames delivered, {fz['out_of_order']} out of order; intact "
                  f"frames lost {fz['intact_lost']} (each beside a damaged frame whose damage left it whole: "
                  f"{fz['damaged_but_whole']}, delivered exactly as sent); {fz['seconds']} s")
            check_fuzz(fz)
        if a.payload_fuzz:
            pf = fuzz_payloads(a.payload_fuzz, src)
            result["payload_fuzz"] = pf
            print(f"payload fuzz: {pf['payloads']:,} damaged step payloads that pass the frame check: "
                  f"{pf['MessageError']:,} refused by the decoder, {pf['LedgerError']:,} by the chain, "
                  f"{pf['accepted']} accepted; ledger intact: {pf['ledger_intact']}; {pf['seconds']} s")
            assert pf["accepted"] == 0 and pf["ledger_intact"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
