//go:build cgo

package ollama

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/ollama/ollama/kvcache"
	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/model"

	"github.com/kvnorm/kvnorm/adapter"
)

// ErrUnsupportedModel is wrapped by Install's error for a model whose cache
// kvnorm cannot replace.
var ErrUnsupportedModel = errors.New("ollama: unsupported model")

// latentAttention lists architectures whose causal cache holds one latent
// vector per token (multi-head latent attention), not one key per KV head.
var latentAttention = map[string]bool{"deepseek2": true, "glm4moelite": true, "deepseekocr": true}

// Install replaces the KV cache of a loaded model with a kvnorm Cache that
// compresses by policy. Call it after model.New and before the cache's Init
// (ollamarunner's NewInputCache). Only models whose own cache is a plain
// *kvcache.Causal are supported.
func Install(m model.Model, policy adapter.Policy) (*Cache, error) {
	return InstallWith(m, Options{Policy: &policy})
}

// InstallWith is Install with every option; the attention shape, the shift
// function and the architecture are taken from the model. A nil o.Policy
// installs a cache that does not compress.
func InstallWith(m model.Model, o Options) (*Cache, error) {
	if m == nil {
		return nil, fmt.Errorf("%w: nil model", ErrUnsupportedModel)
	}
	arch := m.Backend().Config().Architecture()
	if err := CheckCache(arch, m.Config().Cache); err != nil {
		return nil, err
	}
	c, err := newCacheFor(m, o)
	if err != nil {
		return nil, err
	}
	f, err := cacheField(m)
	if err != nil {
		return nil, err
	}
	f.Set(reflect.ValueOf(c))
	if m.Config().Cache != kvcache.Cache(c) {
		return nil, fmt.Errorf("%w: architecture %q: the cache did not take", ErrUnsupportedModel, arch)
	}
	return c, nil
}

// cacheField is m's settable Cache field, which holds the cache its forward
// pass uses (InstallWith sets it once; Session.Twin's sessions set it before
// each pass).
func cacheField(m model.Model) (reflect.Value, error) {
	arch := m.Backend().Config().Architecture()
	v := reflect.ValueOf(m)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return reflect.Value{}, fmt.Errorf("%w: architecture %q: model is a %T, not a pointer to a struct", ErrUnsupportedModel, arch, m)
	}
	f := v.Elem().FieldByName("Cache")
	if !f.IsValid() || !f.CanSet() || !reflect.TypeFor[*Cache]().AssignableTo(f.Type()) {
		return reflect.Value{}, fmt.Errorf("%w: architecture %q: no settable Cache field", ErrUnsupportedModel, arch)
	}
	return f, nil
}

// newCacheFor builds a kvnorm cache shaped for m's attention (InstallWith
// without installing it).
func newCacheFor(m model.Model, o Options) (*Cache, error) {
	cfg := m.Backend().Config()
	arch := cfg.Architecture()
	heads := int(cfg.Uint("attention.head_count"))
	o.Layers = int(cfg.Uint("block_count"))
	o.KVHeads = int(cfg.Uint("attention.head_count_kv", uint32(heads)))
	o.HeadDim = int(cfg.Uint("attention.key_length"))
	if o.HeadDim == 0 && heads > 0 {
		o.HeadDim = int(cfg.Uint("embedding_length")) / heads
	}
	if o.Layers <= 0 || o.KVHeads <= 0 || o.HeadDim <= 0 {
		return nil, fmt.Errorf("%w: architecture %q: cannot read the attention shape (block_count=%d, head_count_kv=%d, key_length=%d)",
			ErrUnsupportedModel, arch, o.Layers, o.KVHeads, o.HeadDim)
	}
	o.Arch = arch
	if o.Shift == nil {
		o.Shift = shiftOf(m)
	}
	return NewCache(o)
}

// CheckCache says whether kvnorm can replace cache, the KV cache a model of
// architecture arch was built with (model.Config().Cache): nil for a plain
// *kvcache.Causal holding keys per KV head, else an error wrapping
// ErrUnsupportedModel that says why. It needs no backend, so the server can
// ask it of the model its text processor builds, before choosing a runner.
func CheckCache(arch string, cache kvcache.Cache) error {
	switch cur := cache.(type) {
	case *kvcache.Causal:
		if latentAttention[arch] {
			return fmt.Errorf("%w: architecture %q caches one latent vector per token (multi-head latent attention), not keys per KV head", ErrUnsupportedModel, arch)
		}
		return nil
	case *kvcache.WrapperCache:
		return fmt.Errorf("%w: architecture %q uses a *kvcache.WrapperCache (sliding-window, chunked or cross-attention layers); kvnorm replaces plain causal caches only", ErrUnsupportedModel, arch)
	case nil:
		return fmt.Errorf("%w: architecture %q has no KV cache", ErrUnsupportedModel, arch)
	default:
		return fmt.Errorf("%w: architecture %q uses a %T cache; kvnorm replaces plain causal caches only", ErrUnsupportedModel, arch, cur)
	}
}

type shifter interface {
	Shift(ctx ml.Context, layer int, key, shift ml.Tensor) (ml.Tensor, error)
}

// shiftOf finds the model's Shift method, on the model or on one of its
// exported fields (text models of multimodal architectures).
func shiftOf(m model.Model) ShiftFunc {
	if s, ok := m.(shifter); ok {
		return s.Shift
	}
	v := reflect.ValueOf(m)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return nil
	}
	v = v.Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		if !v.Type().Field(i).IsExported() || (f.Kind() == reflect.Pointer && f.IsNil()) {
			continue
		}
		if s, ok := f.Interface().(shifter); ok {
			return s.Shift
		}
		if f.CanAddr() {
			if s, ok := f.Addr().Interface().(shifter); ok {
				return s.Shift
			}
		}
	}
	return nil
}
