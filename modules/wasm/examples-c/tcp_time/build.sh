#!/usr/bin/env bash
# Builds tcp_time.c into out/tcp_time.wasm (next to this script; not committed) with
# clang and wasm-ld (Debian: apt-get install clang lld), then checks the module's shape
# as the agent will: it imports only functions of the "imn" host interface, exports
# `memory` and `run`, has no start function. Prints its size, imports and exports.
# Runs from any directory; needs nothing else than bash and coreutils.
#
# CC=... picks the compiler, WASM_LD=... the linker (else wasm-ld, wasm-ld-N, or
# /usr/lib/llvm-N/bin/wasm-ld for clang's version N).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name=tcp_time
out="$here/out/$name.wasm"

die() {
    echo "build.sh: $*" >&2
    exit 1
}
missing() {
    die "$1 not found: install clang and lld (Debian/Ubuntu: apt-get install clang lld)"
}

# The compiler: $CC, clang, or a versioned clang-N.
cc="${CC:-}"
if [ -z "$cc" ]; then
    if command -v clang >/dev/null 2>&1; then
        cc=clang
    else
        cc="$(compgen -c clang- | grep -E '^clang-[0-9]+$' | sort -t- -k2 -n | tail -n1 || true)"
    fi
fi
[ -n "$cc" ] && command -v "$cc" >/dev/null 2>&1 || missing "clang"
major="$("$cc" -dumpversion 2>/dev/null | cut -d. -f1 || true)"

# The linker: $WASM_LD, wasm-ld, wasm-ld-N (Debian's lld-N alone), LLVM's own folder.
ld="${WASM_LD:-}"
if [ -z "$ld" ]; then
    for candidate in wasm-ld "wasm-ld-$major" "/usr/lib/llvm-$major/bin/wasm-ld"; do
        if command -v "$candidate" >/dev/null 2>&1; then
            ld="$(command -v "$candidate")"
            break
        fi
    done
fi
[ -n "$ld" ] && command -v "$ld" >/dev/null 2>&1 || missing "wasm-ld (the WebAssembly linker of lld)"
ld="$(command -v "$ld")"

mkdir -p "$here/out"
obj="$here/out/$name.o"
tmp="$out.tmp"
trap 'rm -f "$obj" "$tmp"' EXIT

# Freestanding wasm32 (the MVP instruction set: what every wasmi version runs), no libc.
# `run` is exported by its export_name attribute.
"$cc" --target=wasm32 -mcpu=mvp -std=c11 -Os -ffreestanding -nostdlib \
    -fno-stack-protector -fvisibility=hidden -Wall -Wextra \
    -c -o "$obj" "$here/$name.c" ||
    die "compiling $name.c failed (the messages above say why)"
# Linked by wasm-ld itself (no linker lookup by the clang driver, which differs between
# versions): no entry point, so no start function; a 16 KiB stack placed first (an
# overflow traps instead of overwriting data) and one 64 KiB page of memory in all,
# exported as `memory` (wasm-ld's default); an undefined symbol (a libc call the
# compiler emitted) is an error, the imn imports excepted (their import_module).
"$ld" --no-entry --stack-first -z stack-size=16384 \
    --initial-memory=65536 --max-memory=65536 --strip-all \
    -o "$tmp" "$obj" ||
    die "linking $name.wasm failed (the messages above say why)"

# ---- the module's shape, read from the binary (bash and od only) ----
mapfile -t bytes < <(od -An -v -tu1 "$tmp" | tr -s ' ' '\n' | grep -v '^$')
total=${#bytes[@]}
pos=0
one_of() { # whether $1 is one of the other arguments
    local x=$1
    shift
    for y in "$@"; do [ "$x" = "$y" ] && return 0; done
    return 1
}
uleb() { # reads an unsigned LEB128 at pos into $val
    val=0
    local shift=0 b
    while :; do
        [ "$pos" -lt "$total" ] || die "$tmp: truncated"
        b=${bytes[pos]}
        pos=$((pos + 1))
        val=$((val | ((b & 127) << shift)))
        shift=$((shift + 7))
        [ $((b & 128)) -ne 0 ] || break
        [ "$shift" -lt 35 ] || die "$tmp: bad LEB128"
    done
}
name_at() { # reads a length-prefixed name at pos into $str
    uleb
    local n=$val i
    str=""
    [ $((pos + n)) -le "$total" ] || die "$tmp: truncated name"
    for ((i = 0; i < n; i++)); do
        str+="$(printf "\\$(printf '%03o' "${bytes[pos + i]}")")"
    done
    pos=$((pos + n))
}
[ "$total" -ge 8 ] && [ "${bytes[*]:0:8}" = "0 97 115 109 1 0 0 0" ] ||
    die "$tmp is not a WebAssembly module (version 1)"
pos=8
# The host interface's functions (ABI 1: FUNCTIONS in modules/probes/src/wasm/host.rs).
known=(params deadline_ms clock_mono_ns clock_wall_ms random log resolve tcp_connect udp_open
    send recv close ping http result last_error)
imports=()
exports=()
bad=""
while [ "$pos" -lt "$total" ]; do
    id=${bytes[pos]}
    pos=$((pos + 1))
    uleb
    end=$((pos + val))
    [ "$end" -le "$total" ] || die "$tmp: a section runs past the end"
    case "$id" in
    2) # imports: module, name, kind (0 = function), its description
        uleb
        for ((k = val; k > 0; k--)); do
            name_at
            mod=$str
            name_at
            kind=${bytes[pos]}
            pos=$((pos + 1))
            imports+=("$mod.$str")
            [ "$mod" = imn ] && [ "$kind" -eq 0 ] && one_of "$str" "${known[@]}" ||
                bad+=" imports $mod.$str (kind $kind), not a function of the imn host interface;"
            case "$kind" in
            0) uleb ;;
            1) pos=$((pos + 1)); uleb; flags=$val; uleb; [ $((flags & 1)) -eq 0 ] || uleb ;;
            2) uleb; flags=$val; uleb; [ $((flags & 1)) -eq 0 ] || uleb ;;
            3) pos=$((pos + 2)) ;;
            *) die "$tmp: unknown import kind $kind" ;;
            esac
        done
        ;;
    7) # exports: name, kind (0 function, 2 memory), index
        uleb
        for ((k = val; k > 0; k--)); do
            name_at
            kind=${bytes[pos]}
            pos=$((pos + 1))
            uleb
            exports+=("$str:$kind")
        done
        ;;
    8) bad+=" it has a start function;" ;;
    esac
    pos=$end
done
one_of run:0 "${exports[@]}" || bad+=" it does not export the function run;"
one_of memory:2 "${exports[@]}" || bad+=" it does not export its memory as memory;"
[ -z "$bad" ] || die "$name.wasm is not a module the agent runs:$bad"

mv "$tmp" "$out"
size=$(wc -c <"$out")
echo "built $out: $size bytes with $("$cc" --version | head -n1), $(basename "$ld")"
echo "  imports: ${imports[*]:-none}"
echo "  exports: ${exports[*]%:*}"
