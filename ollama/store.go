package ollama

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ollama/ollama/types/model"

	"github.com/kvnorm/kvnorm/gguf"
)

// ErrModelNotFound is wrapped by ResolveModel's error for a name that is not
// in the local Ollama store.
var ErrModelNotFound = errors.New("ollama: model not found in the local Ollama store")

// mediaTypeModel is the manifest layer holding the GGUF weights.
const mediaTypeModel = "application/vnd.ollama.image.model"

// StoreDir is the local Ollama store: $OLLAMA_MODELS, else ~/.ollama/models.
func StoreDir() (string, error) {
	if d := os.Getenv("OLLAMA_MODELS"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("ollama: locate the Ollama store: %w", err)
	}
	return filepath.Join(home, ".ollama", "models"), nil
}

// ResolveModel returns the path of the GGUF blob of an Ollama model name
// such as "llama3.2:1b" or "user/model:tag", read from the manifests of the
// local Ollama store (StoreDir). Nothing is downloaded.
func ResolveModel(name string) (string, error) {
	dir, err := StoreDir()
	if err != nil {
		return "", err
	}
	n := model.ParseName(name)
	if !n.IsValid() {
		return "", fmt.Errorf("ollama: %q is not a valid Ollama model name", name)
	}
	manifest := filepath.Join(dir, "manifests", n.Filepath())
	b, err := os.ReadFile(manifest)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%w: %s (no manifest %s; `ollama pull %s` first)", ErrModelNotFound, name, manifest, name)
	}
	if err != nil {
		return "", fmt.Errorf("ollama: model %s: %w", name, err)
	}
	blob, _, err := weightsBlob(dir, b)
	if err != nil {
		return "", fmt.Errorf("ollama: model %s: manifest %s: %w", name, manifest, err)
	}
	return blob, nil
}

// weightsBlob returns the path and size of the GGUF blob a manifest names.
func weightsBlob(store string, manifest []byte) (string, int64, error) {
	var m struct {
		Layers []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(manifest, &m); err != nil {
		return "", 0, err
	}
	for _, l := range m.Layers {
		if l.MediaType != mediaTypeModel {
			continue
		}
		hex, ok := strings.CutPrefix(l.Digest, "sha256:")
		if !ok || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
			return "", 0, fmt.Errorf("bad digest %q", l.Digest)
		}
		blob := filepath.Join(store, "blobs", "sha256-"+hex)
		st, err := os.Stat(blob)
		if err != nil {
			return "", 0, fmt.Errorf("weights blob: %w", err)
		}
		return blob, st.Size(), nil
	}
	return "", 0, fmt.Errorf("has no %s layer", mediaTypeModel)
}

// supportedArchs are the text architectures of Ollama v0.24.0 whose cache
// is a plain causal cache of keys per KV head, which kvnorm's cache replaces
// (and which llama.cpp runs too).
var supportedArchs = map[string]bool{"llama": true, "qwen2": true, "qwen3": true, "mistral3": true}

// LocalModel is a model of the local Ollama store.
type LocalModel struct {
	// Name is the shortest name Ollama accepts, e.g. "llama3.2:1b".
	Name string
	// Path is the GGUF blob and Size its size in bytes.
	Path string
	Size int64
	// Arch is the GGUF's general.architecture ("" when unreadable).
	Arch string
	// Supported is set for architectures kvnorm's Ollama cache replaces
	// (llama, qwen2, qwen3, mistral3).
	Supported bool
}

// LocalModels lists the models of the local Ollama store (StoreDir) that
// have a GGUF weights blob, smallest first (then by name). Manifests that
// cannot be read are left out; a missing store is an empty list.
func LocalModels() ([]LocalModel, error) {
	dir, err := StoreDir()
	if err != nil {
		return nil, err
	}
	root := filepath.Join(dir, "manifests")
	var out []LocalModel
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == root && errors.Is(err, fs.ErrNotExist) {
				return fs.SkipAll
			}
			return nil // unreadable entries are skipped
		}
		if d.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return nil
		}
		n := model.ParseNameFromFilepath(rel)
		if !n.IsValid() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		blob, size, err := weightsBlob(dir, b)
		if err != nil {
			return nil
		}
		lm := LocalModel{Name: n.DisplayShortest(), Path: blob, Size: size}
		if f, err := gguf.Open(blob); err == nil {
			lm.Arch, _ = gguf.Get[string](f, "general.architecture")
			f.Close()
		}
		lm.Supported = supportedArchs[lm.Arch]
		out = append(out, lm)
		return nil
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(out, func(a, b LocalModel) int {
		return cmp.Or(cmp.Compare(a.Size, b.Size), cmp.Compare(a.Name, b.Name))
	})
	return out, nil
}
