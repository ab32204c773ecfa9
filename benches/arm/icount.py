"""Instructions per inference on emulated ARM cores: the suite's ARM stage.

Timings under qemu mean nothing; instruction counts do (read
benches/arm/README.md for how far). For each model and each core profile,
the same `edgeinfer bench` runs under qemu-user with a plugin that counts
the guest instructions of the main thread (where a one-thread inference
runs), once with R1 inferences and once with R2: (count(R2) - count(R1)) /
(R2 - R1) is one inference, loading and warm-up cancelled out. tract and
ONNX Runtime (its aarch64 library from the same pinned wheel as the x86
side, loaded by the same binary) are counted alike; ONNX Runtime's counts
vary between runs on small models, so it gets the minimum of three.

Needs root: an ARM /proc/cpuinfo is bound over the host's in a private
mount namespace (`unshare -m`), because tract picks its kernels from the
CPU part and features listed there, and ONNX Runtime's cpuinfo library
crashes on qemu-user's x86 one.

Run alone: python3 benches/arm/icount.py BINARY ORTLIB CORE MODEL...
(CORE: a53, a55, a76 or armv7-a7; ORTLIB "-" for tract only).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# qemu -cpu, the CPU part and the features the cpuinfo lists: the A53 has
# no dot product (most gateways: Raspberry Pi 3, i.MX 8M, RK3328), the
# A55 and A76 have it (RK3566/RK3588, Raspberry Pi 5 has A76).
CORES = {
    "a53": ("aarch64", "cortex-a53", "8", "0xd03",
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "a55": ("aarch64", "cortex-a76", "8", "0xd05",
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
    "a76": ("aarch64", "cortex-a76", "8", "0xd0b",
            "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"),
    # 32-bit gateways (Raspberry Pi 2, Allwinner H3): tract only.
    "armv7-a7": ("arm", "cortex-a7", "7", "0xc07",
                 "half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt lpae evtstrm"),
}
SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu", "arm": "/usr/arm-linux-gnueabihf"}


def plugin():
    """The counting plugin (benches/arm/insn.c), built once."""
    out = Path(tempfile.gettempdir()) / "edgeinfer-icount" / "libinsn.so"
    src = HERE / "insn.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(src)], check=True)
    return out


def cpuinfo(core):
    _, _, arch, part, features = CORES[core]
    f = tempfile.NamedTemporaryFile("w", suffix=".cpuinfo", delete=False)
    for n in range(4):
        f.write(f"processor\t: {n}\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
                f"CPU architecture: {arch}\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 4\n\n")
    f.close()
    return f.name


def count(binary, core, model, engine, runs, lib):
    """Main-thread instructions of `bench` with `runs` inferences, or an error."""
    qemu_arch, qcpu = CORES[core][0], CORES[core][1]
    out = tempfile.mktemp(suffix=".count")
    info = cpuinfo(core)
    ort = ["--onnxruntime-library", lib] if lib else []
    bench = [binary, "bench", "-m", str(model), "--runs", str(runs), "--backend", engine, "--json", *ort]
    inner = (f"mount --bind {info} /proc/cpuinfo && exec qemu-{qemu_arch} -cpu {qcpu} -L {SYSROOT[qemu_arch]} "
             f"-plugin {plugin()},out={out} " + " ".join(f"'{a}'" for a in bench))
    r = subprocess.run(["unshare", "-m", "sh", "-c", inner], capture_output=True, text=True,
                       env={"RUST_LOG": "error", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    Path(info).unlink(missing_ok=True)
    try:
        text = Path(out).read_text()
        Path(out).unlink()
    except OSError:
        return {"error": (r.stderr.strip() or "no count")[-200:]}
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-200:]}
    return {"count": int(next(l.split()[1] for l in text.splitlines() if l.startswith("main")))}


def per_inference(binary, core, model, engine, lib):
    """Instructions of one inference, or an error: the difference of two
    runs, 1 and 3 inferences for large models, 5 and 25 for small ones."""
    def between(r1, r2):
        a = count(binary, core, model, engine, r1, lib)
        b = count(binary, core, model, engine, r2, lib)
        for x in (a, b):
            if "error" in x:
                return x
        return {"per_inference": (b["count"] - a["count"]) // (r2 - r1)}
    rough = between(1, 3)
    if "error" in rough or rough["per_inference"] >= 10_000_000:
        return rough
    return between(5, 25)


def measure(binary, core, model, lib):
    """One row: tract's count, ONNX Runtime's (minimum of three), the ratio."""
    row = {"model": Path(model).stem, "core": core}
    t = per_inference(binary, core, model, "tract", None)
    row["tract"] = t.get("per_inference")
    if "error" in t:
        row["tract_error"] = t["error"]
    if lib and CORES[core][0] == "aarch64":
        tries = [per_inference(binary, core, model, "onnxruntime", lib) for _ in range(3)]
        counts = [x["per_inference"] for x in tries if "per_inference" in x]
        row["onnxruntime"] = min(counts) if counts else None
        if not counts:
            row["onnxruntime_error"] = tries[0].get("error")
        if row["tract"] and row["onnxruntime"]:
            row["tract_vs_onnxruntime"] = row["tract"] / row["onnxruntime"]
    return row


if __name__ == "__main__":
    if len(sys.argv) < 5:
        raise SystemExit(__doc__)
    binary, lib, core = sys.argv[1], sys.argv[2], sys.argv[3]
    for m in sys.argv[4:]:
        print(json.dumps(measure(binary, core, m, None if lib == "-" else lib)), flush=True)
