#!/usr/bin/env python3
"""Where a firmware binary's bytes go: section sizes, and code by crate.

    cross/ledger.py NM UNSTRIPPED_BINARY [--c NAME=ARCHIVE.a]... [--top N]

Reads the symbol table of the unstripped binary (the one cross/build.sh strips) with
the target's `nm`, and sums each function's size into the crate its demangled path
starts with (`sled::tree::...` is sled; `<sled::Tree as core::fmt::Debug>::fmt` is
sled too, the implementing type's crate). The same grouping as `cargo bloat --crates`, without
needing cargo-bloat or a host build: it measures the very file that ships. C and
assembly functions are named by the archive (`--c libc=.../libc.a`) that defines them,
or `[other C]`; aliases of one address count once.

Prints markdown: one line of section sizes, then a table of the top crates.
"""
import os
import re
import subprocess
import sys
from collections import defaultdict

STD = {"std", "core", "alloc", "std_detect", "compiler_builtins", "panic_abort", "hashbrown",
       "rustc_demangle", "addr2line", "gimli", "miniz_oxide", "object", "memchr_std"}


def split_qualified(n: str):
    """`<A as B>::f` -> (A, B); None when `n` does not start so."""
    if not n.startswith("<"):
        return None
    depth = 0
    for i, ch in enumerate(n):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
            if depth == 0:
                return None
        elif depth == 1 and n.startswith(" as ", i):
            return n[1:i], n[i + 4:]
    return None


def crate_of(name: str) -> str:
    if name.startswith("OUTLINED_FUNCTION_"):
        return "[outlined]"  # the machine outliner's shared tails, of every crate
    n = name
    # `<A as B>::f`: the crate of A, or of B when A is a type parameter, a primitive, a
    # tuple or a slice (`<&T as core::fmt::Debug>::fmt`, `<(A,B) as sled::...>`).
    q = split_qualified(n)
    if q:
        a, b = q
        n = a if "::" in a.split("<", 1)[0] else b
    n = re.sub(r"^(?:<|&(?:mut )?|\*(?:const|mut) |\[|\(|dyn )+", "", n)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", n)
    if not m:
        return ""
    c = m.group(1)
    if c in STD:
        return "std"
    return c


def main() -> int:
    args = sys.argv[1:]
    top = 25
    archives = []
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i:i + 2]
    while "--c" in args:
        i = args.index("--c")
        archives.append(args[i + 1].split("=", 1))
        del args[i:i + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    nm, binary = args
    c_owner = {}
    for owner, path in archives:
        if not os.path.exists(path):
            print(f"cross/ledger.py: {path} ({owner}) is missing", file=sys.stderr)
            return 2
        out = subprocess.run([nm, "--defined-only", path], capture_output=True, text=True,
                             check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTwW":
                c_owner.setdefault(parts[2], f"[{owner}]" if owner != "ring" else owner)
    sections = {}
    size = subprocess.run([nm.replace("nm", "size") if nm.endswith("nm") else "size", "-A", binary],
                          capture_output=True, text=True, check=True).stdout
    for line in size.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    raw = subprocess.run([nm, "-S", "--size-sort", binary], capture_output=True, text=True,
                         check=True).stdout
    dem = subprocess.run([nm, "-S", "--size-sort", "-C", binary], capture_output=True, text=True,
                         check=True).stdout
    by_crate = defaultdict(int)
    text_total = 0
    seen = set()
    for r, d in zip(raw.splitlines(), dem.splitlines()):
        rp = r.split(maxsplit=3)
        dp = d.split(maxsplit=3)
        if len(rp) < 4 or rp[2] not in "tTwW" or rp[0] in seen:
            continue
        seen.add(rp[0])
        sz = int(rp[1], 16)
        text_total += sz
        mangled, name = rp[3], dp[3]
        crate = crate_of(name)
        if not crate:
            crate = c_owner.get(mangled, "[other C]")
        by_crate[crate] += sz
    secs = ", ".join(f"`{s}` {sections[s]:,}" for s in (".text", ".rodata", ".data.rel.ro", ".data", ".bss")
                     if s in sections)
    print(f"sections: {secs}; functions with a symbol: {text_total:,} bytes\n")
    print("| crate | code (bytes) | share |")
    print("|---|---:|---:|")
    rows = sorted(by_crate.items(), key=lambda kv: -kv[1])
    for c, sz in rows[:top]:
        print(f"| {c} | {sz:,} | {100.0 * sz / max(text_total, 1):.1f}% |")
    rest = sum(sz for _, sz in rows[top:])
    if rest:
        print(f"| {len(rows) - top} others | {rest:,} | {100.0 * rest / max(text_total, 1):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
