#!/usr/bin/env bash
# Builds libllama.so (llama.cpp + ggml with its CPU backend) from the pinned
# Ollama module's vendored llama.cpp sources in the Go module cache, with the
# defines Ollama's cgo packages use. Objects are cached under OUT/obj (a
# source is recompiled only when newer than its object), so CI builds it once
# per clean clone. libggml.so and libggml-base.so are empty libraries that
# need libllama.so: an app that loads llama.cpp as three libraries (yzma)
# finds every symbol through them.
#
#   build-so.sh OLLAMA_MODULE_DIR OUT
set -euo pipefail
mod=${1:?ollama module dir}
out=${2:?output dir}
jobs=${JOBS:-$(nproc)}
# Tests only need it correct, not fast: -O1 compiles several times faster
# than -O3 (override with LIBLLAMA_CFLAGS / LIBLLAMA_CXXFLAGS).
march=; grep -qw avx2 /proc/cpuinfo 2>/dev/null && march=-march=x86-64-v3
cflags=${LIBLLAMA_CFLAGS:--O1 $march}
cxxflags=${LIBLLAMA_CXXFLAGS:--O1 $march}

g=$mod/ml/backend/ggml/ggml
l=$mod/llama/llama.cpp
inc=(-I"$g/include" -I"$g/src" -I"$g/src/ggml-cpu" -I"$g/src/ggml-cpu/amx" -I"$g/src/ggml-cpu/llamafile" -I"$l/include" -I"$l/src" -I"$l/vendor")
defs=(-DNDEBUG -DGGML_USE_CPU -DGGML_USE_LLAMAFILE -D_GNU_SOURCE -DGGML_VERSION=0x0 -DGGML_COMMIT=0x0 -DGGML_SHARED -DGGML_BUILD -DLLAMA_SHARED -DLLAMA_BUILD)

srcs=()
for d in "$g/src" "$g/src/ggml-cpu" "$g/src/ggml-cpu/amx" "$g/src/ggml-cpu/llamafile" "$g/src/ggml-cpu/arch/x86" "$l/src" "$l/src/models"; do
	for f in "$d"/*.c "$d"/*.cpp; do
		[ -e "$f" ] && srcs+=("$f")
	done
done

mkdir -p "$out/obj" "$out/lib"
compile() {
	src=$1
	obj=$out/obj/$(echo "${src#"$mod"/}" | tr '/' '_').o
	[ "$obj" -nt "$src" ] && { echo "$obj"; return; }
	case $src in
	*.c) cc -std=c11 $cflags -fPIC "${defs[@]}" "${inc[@]}" -c "$src" -o "$obj.tmp" ;;
	*) c++ -std=c++17 $cxxflags -fPIC "${defs[@]}" "${inc[@]}" -c "$src" -o "$obj.tmp" ;;
	esac
	mv "$obj.tmp" "$obj"
	echo "$obj"
}
export -f compile
export mod out cflags cxxflags
export defs_s="${defs[*]}" inc_s="${inc[*]}"
# bash arrays do not cross export: rebuild them in the child.
printf '%s\n' "${srcs[@]}" | xargs -P "$jobs" -I{} bash -c 'defs=($defs_s); inc=($inc_s); compile "$1" >/dev/null' _ {}

objs=()
for s in "${srcs[@]}"; do objs+=("$out/obj/$(echo "${s#"$mod"/}" | tr '/' '_').o"); done
c++ -shared -o "$out/lib/libllama.so.tmp" "${objs[@]}" -lpthread -lm -ldl
mv "$out/lib/libllama.so.tmp" "$out/lib/libllama.so"
for n in ggml ggml-base; do
	echo "" | cc -shared -fPIC -x c - -o "$out/lib/lib$n.so" -L"$out/lib" -Wl,--no-as-needed -lllama -Wl,-rpath,'$ORIGIN'
done
echo "$out/lib/libllama.so: ${#srcs[@]} sources"
