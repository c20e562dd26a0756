package llama2c

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// Errors wrapped by this package.
var (
	// ErrFormat marks a malformed checkpoint or tokenizer file.
	ErrFormat = errors.New("llama2c: malformed file")
	// ErrTruncated marks a file shorter than its header declares. Errors
	// wrapping it also match ErrFormat.
	ErrTruncated error = &subError{"llama2c: truncated file", ErrFormat}
	// ErrInvalid marks an invalid argument.
	ErrInvalid = errors.New("llama2c: invalid argument")
)

type subError struct {
	msg    string
	parent error
}

func (e *subError) Error() string        { return e.msg }
func (e *subError) Is(target error) bool { return target == e.parent }

// Bounds on header fields, far above any llama2.c model (Llama 2 70B has dim
// 8192, hidden 28672, 80 layers), so that size arithmetic cannot overflow.
const (
	maxDim     = 1 << 16
	maxHidden  = 1 << 18
	maxLayers  = 1 << 10
	maxVocab   = 1 << 22
	maxSeqLen  = 1 << 22
	headerSize = 7 * 4
)

// magicV1 is the first int32 of llama2.c's later "ak42" export format.
const magicV1 = 0x616b3432

// Config is the checkpoint header.
type Config struct {
	Dim       int // model width (embedding length)
	HiddenDim int // FFN width
	NLayers   int
	NHeads    int // query heads
	NKVHeads  int // key/value heads (grouped-query attention when < NHeads)
	VocabSize int
	SeqLen    int // trained context length
	// SharedClassifier is true when the output classifier is the token
	// embedding (a positive vocab_size in the file).
	SharedClassifier bool
}

// HeadSize returns Dim / NHeads.
func (c Config) HeadSize() int { return c.Dim / c.NHeads }

// KVDim returns the width of the keys and values of one layer,
// NKVHeads * HeadSize.
func (c Config) KVDim() int { return c.NKVHeads * c.HeadSize() }

// Validate checks that every field is positive and bounded, that NHeads
// divides Dim, that NKVHeads divides NHeads and that the head size is even
// (RoPE rotates pairs). Errors wrap ErrFormat and name the field.
func (c Config) Validate() error {
	for _, f := range []struct {
		name   string
		v, max int
	}{
		{"dim", c.Dim, maxDim},
		{"hidden_dim", c.HiddenDim, maxHidden},
		{"n_layers", c.NLayers, maxLayers},
		{"n_heads", c.NHeads, maxDim},
		{"n_kv_heads", c.NKVHeads, maxDim},
		{"vocab_size", c.VocabSize, maxVocab},
		{"seq_len", c.SeqLen, maxSeqLen},
	} {
		if f.v <= 0 || f.v > f.max {
			return fmt.Errorf("%w: header: %s %d out of range [1, %d]", ErrFormat, f.name, f.v, f.max)
		}
	}
	if c.Dim%c.NHeads != 0 {
		return fmt.Errorf("%w: header: n_heads %d does not divide dim %d", ErrFormat, c.NHeads, c.Dim)
	}
	if c.NHeads%c.NKVHeads != 0 {
		return fmt.Errorf("%w: header: n_kv_heads %d does not divide n_heads %d", ErrFormat, c.NKVHeads, c.NHeads)
	}
	if c.HeadSize()%2 != 0 {
		return fmt.Errorf("%w: header: head size %d (dim %d / n_heads %d) is odd", ErrFormat, c.HeadSize(), c.Dim, c.NHeads)
	}
	return nil
}

// weightCount returns the number of float32 values of the weights proper
// (without the RoPE tables and the separate classifier).
func (c Config) weightCount() int64 {
	d, h, l, kv := int64(c.Dim), int64(c.HiddenDim), int64(c.NLayers), int64(c.KVDim())
	return int64(c.VocabSize)*d + // token embedding
		l*(d+d*d+2*kv*d+d*d+d+3*h*d) + // norms, wq, wk, wv, wo, w1, w2, w3
		d // final norm
}

// FileSize returns the size in bytes of a checkpoint with this header: the
// header, the weights, the RoPE tables and, unless shared, the classifier.
// The Config must be valid.
func (c Config) FileSize() int64 {
	n := c.weightCount() + int64(c.SeqLen)*int64(c.HeadSize()) // real and imaginary [seq_len][hs/2]
	if !c.SharedClassifier {
		n += int64(c.VocabSize) * int64(c.Dim)
	}
	return headerSize + 4*n
}

// Layer holds the weights of one transformer block. Matrices are row-major
// [out][in].
type Layer struct {
	AttnNorm []float32 // [Dim]
	WQ       []float32 // [Dim][Dim]
	WK       []float32 // [KVDim][Dim]
	WV       []float32 // [KVDim][Dim]
	WO       []float32 // [Dim][Dim]
	FFNNorm  []float32 // [Dim]
	W1       []float32 // [HiddenDim][Dim], the gate
	W2       []float32 // [Dim][HiddenDim], the down projection
	W3       []float32 // [HiddenDim][Dim], the up projection
}

// Checkpoint is a llama2.c model.
type Checkpoint struct {
	Config         Config
	TokenEmbedding []float32 // [VocabSize][Dim]
	Layers         []Layer
	FinalNorm      []float32 // [Dim]
	// Classifier is [VocabSize][Dim]; it is the TokenEmbedding slice itself
	// when Config.SharedClassifier is true.
	Classifier []float32
}

// ReadCheckpoint reads and validates a llama2.c checkpoint file.
func ReadCheckpoint(path string) (*Checkpoint, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return nil, err
	}
	ck, err := ReadCheckpointFrom(fd, st.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ck, nil
}

// ReadCheckpointFrom reads a checkpoint of size bytes from r. The header is
// validated and the size it implies must equal size exactly before any
// weight is allocated, so a corrupt header cannot cause a huge allocation.
// Non-finite weights are rejected, naming the tensor.
func ReadCheckpointFrom(r io.ReaderAt, size int64) (*Checkpoint, error) {
	if size < headerSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrTruncated, size, headerSize)
	}
	var hdr [headerSize]byte
	if _, err := r.ReadAt(hdr[:], 0); err != nil {
		return nil, fmt.Errorf("llama2c: reading header: %w", err)
	}
	var h [7]int32
	for i := range h {
		h[i] = int32(binary.LittleEndian.Uint32(hdr[4*i:]))
	}
	if uint32(h[0]) == magicV1 {
		return nil, fmt.Errorf("%w: magic \"ak42\": llama2.c's version 1/2 export format is not supported, only the legacy version 0 format", ErrFormat)
	}
	c := Config{
		Dim: int(h[0]), HiddenDim: int(h[1]), NLayers: int(h[2]), NHeads: int(h[3]), NKVHeads: int(h[4]),
		VocabSize: int(h[5]), SeqLen: int(h[6]), SharedClassifier: h[5] > 0,
	}
	if h[5] < 0 && h[5] != math.MinInt32 {
		c.VocabSize = -int(h[5])
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if want := c.FileSize(); size != want {
		kind, what := ErrTruncated, "short"
		if size > want {
			kind, what = ErrFormat, "long"
		}
		return nil, fmt.Errorf("%w: file is %d bytes, %d bytes too %s for its header (dim %d, hidden_dim %d, n_layers %d, n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d, shared classifier %v: want %d bytes)",
			kind, size, absDiff(size, want), what, c.Dim, c.HiddenDim, c.NLayers, c.NHeads, c.NKVHeads, c.VocabSize, c.SeqLen, c.SharedClassifier, want)
	}

	br := bufio.NewReaderSize(io.NewSectionReader(r, headerSize, size-headerSize), 1<<16)
	n := c.weightCount()
	if !c.SharedClassifier {
		n += int64(c.VocabSize) * int64(c.Dim)
	}
	all := make([]float32, n)
	ropeFloats := int64(c.SeqLen) * int64(c.HeadSize())
	if err := readFloats(br, all[:c.weightCount()]); err != nil {
		return nil, err
	}
	if _, err := br.Discard(int(4 * ropeFloats)); err != nil {
		return nil, fmt.Errorf("llama2c: skipping RoPE tables: %w", err)
	}
	if err := readFloats(br, all[c.weightCount():]); err != nil {
		return nil, err
	}
	ck := checkpointFrom(c, all)
	if err := ck.checkFinite(); err != nil {
		return nil, err
	}
	return ck, nil
}

func absDiff(a, b int64) int64 {
	if a > b {
		return a - b
	}
	return b - a
}

func readFloats(r io.Reader, dst []float32) error {
	var buf [4096]byte
	for len(dst) > 0 {
		k := min(len(dst), len(buf)/4)
		if _, err := io.ReadFull(r, buf[:4*k]); err != nil {
			return fmt.Errorf("llama2c: reading weights: %w", err)
		}
		for i := range k {
			dst[i] = math.Float32frombits(binary.LittleEndian.Uint32(buf[4*i:]))
		}
		dst = dst[k:]
	}
	return nil
}

// NewCheckpoint returns a checkpoint with the given header and zero weights
// of the right shapes, for building models in code (tests, synthetic
// fixtures). The Config must pass Validate.
func NewCheckpoint(c Config) (*Checkpoint, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	n := c.weightCount()
	if !c.SharedClassifier {
		n += int64(c.VocabSize) * int64(c.Dim)
	}
	if n > 1<<31 {
		return nil, fmt.Errorf("%w: %d weights is too many to allocate in NewCheckpoint", ErrInvalid, n)
	}
	return checkpointFrom(c, make([]float32, n)), nil
}

// checkpointFrom slices the weights, in file order, out of all.
func checkpointFrom(c Config, all []float32) *Checkpoint {
	take := func(n int) []float32 {
		s := all[:n:n]
		all = all[n:]
		return s
	}
	d, h, l, kv := c.Dim, c.HiddenDim, c.NLayers, c.KVDim()
	ck := &Checkpoint{Config: c, TokenEmbedding: take(c.VocabSize * d), Layers: make([]Layer, l)}
	// Each kind of weight is stored for all layers before the next kind.
	for i := range l {
		ck.Layers[i].AttnNorm = take(d)
	}
	for i := range l {
		ck.Layers[i].WQ = take(d * d)
	}
	for i := range l {
		ck.Layers[i].WK = take(kv * d)
	}
	for i := range l {
		ck.Layers[i].WV = take(kv * d)
	}
	for i := range l {
		ck.Layers[i].WO = take(d * d)
	}
	for i := range l {
		ck.Layers[i].FFNNorm = take(d)
	}
	for i := range l {
		ck.Layers[i].W1 = take(h * d)
	}
	for i := range l {
		ck.Layers[i].W2 = take(d * h)
	}
	for i := range l {
		ck.Layers[i].W3 = take(h * d)
	}
	ck.FinalNorm = take(d)
	if c.SharedClassifier {
		ck.Classifier = ck.TokenEmbedding
	} else {
		ck.Classifier = take(c.VocabSize * d)
	}
	return ck
}

// tensors lists the weights with their llama2.c names, in file order.
func (ck *Checkpoint) tensors() []namedTensor {
	ts := []namedTensor{{"token_embedding", -1, ck.TokenEmbedding}}
	for _, f := range []struct {
		name string
		get  func(*Layer) []float32
	}{
		{"rms_att_weight", func(l *Layer) []float32 { return l.AttnNorm }},
		{"wq", func(l *Layer) []float32 { return l.WQ }},
		{"wk", func(l *Layer) []float32 { return l.WK }},
		{"wv", func(l *Layer) []float32 { return l.WV }},
		{"wo", func(l *Layer) []float32 { return l.WO }},
		{"rms_ffn_weight", func(l *Layer) []float32 { return l.FFNNorm }},
		{"w1", func(l *Layer) []float32 { return l.W1 }},
		{"w2", func(l *Layer) []float32 { return l.W2 }},
		{"w3", func(l *Layer) []float32 { return l.W3 }},
	} {
		for i := range ck.Layers {
			ts = append(ts, namedTensor{f.name, i, f.get(&ck.Layers[i])})
		}
	}
	ts = append(ts, namedTensor{"rms_final_weight", -1, ck.FinalNorm})
	if !ck.Config.SharedClassifier {
		ts = append(ts, namedTensor{"wcls", -1, ck.Classifier})
	}
	return ts
}

type namedTensor struct {
	name  string
	layer int // -1 for global tensors
	data  []float32
}

func (t namedTensor) String() string {
	if t.layer < 0 {
		return t.name
	}
	return fmt.Sprintf("layer %d %s", t.layer, t.name)
}

func (ck *Checkpoint) checkFinite() error {
	for _, t := range ck.tensors() {
		for i, v := range t.data {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return fmt.Errorf("%w: %s: element %d is %v", ErrFormat, t, i, v)
			}
		}
	}
	return nil
}

// check verifies that the weight slices have the lengths the Config implies.
func (ck *Checkpoint) check() error {
	c := ck.Config
	if err := c.Validate(); err != nil {
		return err
	}
	if len(ck.Layers) != c.NLayers {
		return fmt.Errorf("%w: %d layers, config says %d", ErrInvalid, len(ck.Layers), c.NLayers)
	}
	if c.SharedClassifier && len(ck.Classifier) > 0 && &ck.Classifier[0] != &ck.TokenEmbedding[0] {
		return fmt.Errorf("%w: shared classifier is not the token embedding", ErrInvalid)
	}
	d, h, kv, v := c.Dim, c.HiddenDim, c.KVDim(), c.VocabSize
	want := map[string]int{
		"token_embedding": v * d, "rms_att_weight": d, "wq": d * d, "wk": kv * d, "wv": kv * d, "wo": d * d,
		"rms_ffn_weight": d, "w1": h * d, "w2": d * h, "w3": h * d, "rms_final_weight": d, "wcls": v * d,
	}
	for _, t := range ck.tensors() {
		if len(t.data) != want[t.name] {
			return fmt.Errorf("%w: %s has %d values, want %d", ErrInvalid, t, len(t.data), want[t.name])
		}
	}
	return nil
}

// WriteTo writes the checkpoint in llama2.c's legacy format, RoPE tables
// included (cos and sin of pos * 10000^(-2i/head_size)), so that llama2.c
// itself can run it.
func (ck *Checkpoint) WriteTo(w io.Writer) (int64, error) {
	if err := ck.check(); err != nil {
		return 0, err
	}
	c := ck.Config
	bw := bufio.NewWriterSize(w, 1<<16)
	var n int64
	put := func(v uint32) error {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], v)
		k, err := bw.Write(b[:])
		n += int64(k)
		return err
	}
	vocab := int32(c.VocabSize)
	if !c.SharedClassifier {
		vocab = -vocab
	}
	for _, v := range []int32{int32(c.Dim), int32(c.HiddenDim), int32(c.NLayers), int32(c.NHeads),
		int32(c.NKVHeads), vocab, int32(c.SeqLen)} {
		if err := put(uint32(v)); err != nil {
			return n, err
		}
	}
	ts := ck.tensors()
	cls := len(ts)
	if !c.SharedClassifier {
		cls--
	}
	for _, t := range ts[:cls] {
		for _, v := range t.data {
			if err := put(math.Float32bits(v)); err != nil {
				return n, err
			}
		}
	}
	hs := c.HeadSize()
	for part := range 2 {
		for pos := range c.SeqLen {
			for i := 0; i < hs; i += 2 {
				a := float64(pos) * math.Pow(10000, -float64(i)/float64(hs))
				v := math.Cos(a)
				if part == 1 {
					v = math.Sin(a)
				}
				if err := put(math.Float32bits(float32(v))); err != nil {
					return n, err
				}
			}
		}
	}
	for _, t := range ts[cls:] {
		for _, v := range t.data {
			if err := put(math.Float32bits(v)); err != nil {
				return n, err
			}
		}
	}
	return n, bw.Flush()
}
