#!/usr/bin/env bash
# A new Go module that requires kvnorm and imports its llama.cpp packages
# builds with plain `go mod tidy && go build`: no make step, nothing written
# into kvnorm's tree. kvnorm is a clone of this repository's HEAD made
# read-only, as the module cache holds a dependency. Run by `make
# fresh-module` (CI runs it after `make test`).
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp"; rm -rf "$tmp"' EXIT

git clone -q --no-hardlinks "$root" "$tmp/kvnorm"
rm -rf "$tmp/kvnorm/.git"
chmod -R a-w "$tmp/kvnorm"

mkdir "$tmp/app"
cd "$tmp/app"
cat > go.mod <<MOD
module example.com/app

go 1.26.0

require github.com/kvnorm/kvnorm v0.0.0

replace github.com/kvnorm/kvnorm => $tmp/kvnorm
MOD
cat > main.go <<'GO'
// An app that compresses llama.cpp contexts with kvnorm: its own
// (kvnorm/llamacpp, cgo) or one loaded at run time (kvnorm/llamacpp/libllama).
package main

import (
	"fmt"
	"os"

	"github.com/kvnorm/kvnorm/adapter"
	"github.com/kvnorm/kvnorm/llamacpp"
	"github.com/kvnorm/kvnorm/llamacpp/libllama"
)

func main() {
	if len(os.Args) > 1 {
		m, err := llamacpp.Open(os.Args[1])
		fmt.Println(m, err)
	}
	_, err := libllama.Open("libllama.so")
	fmt.Println(adapter.DefaultPolicy().Keep, err)
}
GO
go mod tidy
go build -o app .
echo "fresh module: go build with cgo: ok ($(du -h app | cut -f1))"
CGO_ENABLED=0 go build -o app-nocgo .
echo "fresh module: CGO_ENABLED=0 go build: ok"
if [ -n "$(find "$tmp/kvnorm" -newer go.mod -print -quit)" ]; then
	echo "fresh module: the build wrote into kvnorm's tree" >&2
	exit 1
fi
