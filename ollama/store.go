package ollama

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/ollama/ollama/types/model"
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
	var m struct {
		Layers []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return "", fmt.Errorf("ollama: model %s: manifest %s: %w", name, manifest, err)
	}
	for _, l := range m.Layers {
		if l.MediaType != mediaTypeModel {
			continue
		}
		hex, ok := strings.CutPrefix(l.Digest, "sha256:")
		if !ok || len(hex) != 64 || strings.Trim(hex, "0123456789abcdef") != "" {
			return "", fmt.Errorf("ollama: model %s: manifest %s: bad digest %q", name, manifest, l.Digest)
		}
		blob := filepath.Join(dir, "blobs", "sha256-"+hex)
		if _, err := os.Stat(blob); err != nil {
			return "", fmt.Errorf("ollama: model %s: weights blob: %w", name, err)
		}
		return blob, nil
	}
	return "", fmt.Errorf("ollama: model %s: manifest %s has no %s layer", name, manifest, mediaTypeModel)
}
