package statemode

import (
	"encoding/binary"
	"fmt"
	"math/bits"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// ggml type ids (enum ggml_type) of the K cache types the kernels read.
const (
	ggmlF32  = 0
	ggmlF16  = 1
	ggmlQ4_0 = 2
	ggmlQ8_0 = 8
	ggmlBF16 = 30
)

// Bounds a well-formed state never exceeds (llama.cpp's LLAMA_MAX_SEQ is 256).
const (
	maxStateStreams = 256
	maxStateSeqs    = 256
	maxStateLayers  = 1 << 12
)

// SeqState is the parsed output of llama_state_seq_get_data for one sequence:
// the sequence's cells and, per layer, their key rows. llama.cpp writes
//
//	u32 n_stream, then per stream: u32 cell_count and, when cell_count > 0,
//	  cell_count × {i32 pos, u32 n_seq, i32 seq_ids[n_seq]},
//	  u32 v_trans, u32 n_layer,
//	  n_layer × {i32 k_type, u64 k_row_bytes, cell_count K rows},
//	  then the V rows (per layer, or transposed per element when v_trans).
//
// K rows are in cell order: use each cell's Pos, never the row index, as the
// position.
type SeqState struct {
	Streams int
	Cells   []StateCell
	VTrans  bool
	Layers  []StateLayer // the K cache of each layer
}

// StateCell is one KV cell of the sequence.
type StateCell struct {
	Stream int
	Pos    hooks.Pos
	Seqs   []hooks.SeqID
}

// StateLayer holds the keys of one layer: one row per cell of Cells, each
// RowBytes long, of ggml type KType (all KV heads of the cell back to back).
type StateLayer struct {
	KType    int32
	RowBytes int
	Rows     []byte
}

// Positions returns the position of every cell, in cell order.
func (s *SeqState) Positions() []hooks.Pos {
	p := make([]hooks.Pos, len(s.Cells))
	for i, c := range s.Cells {
		p[i] = c.Pos
	}
	return p
}

// stateReader reads little-endian values and bounds every length by what is
// left, so a truncated or hostile state yields an error, never a panic or a
// huge allocation.
type stateReader struct {
	b   []byte
	off int
}

func (r *stateReader) need(n uint64, what string) error {
	if n > uint64(len(r.b)-r.off) {
		return fmt.Errorf("%w: %s: need %d bytes at offset %d, %d left", ErrState, what, n, r.off, len(r.b)-r.off)
	}
	return nil
}

func (r *stateReader) u32(what string) (uint32, error) {
	if err := r.need(4, what); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint32(r.b[r.off:])
	r.off += 4
	return v, nil
}

func (r *stateReader) u64(what string) (uint64, error) {
	if err := r.need(8, what); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint64(r.b[r.off:])
	r.off += 8
	return v, nil
}

// span returns the next a×b bytes without copying.
func (r *stateReader) span(a, b uint64, what string) ([]byte, error) {
	hi, n := bits.Mul64(a, b)
	if hi != 0 {
		return nil, fmt.Errorf("%w: %s: %d × %d bytes overflows", ErrState, what, a, b)
	}
	if err := r.need(n, what); err != nil {
		return nil, err
	}
	s := r.b[r.off : r.off+int(n) : r.off+int(n)]
	r.off += int(n)
	return s, nil
}

// ParseSeqState parses the bytes llama_state_seq_get_data wrote for one
// sequence. The layer rows alias b when the sequence lives in one stream.
func ParseSeqState(b []byte) (*SeqState, error) {
	r := &stateReader{b: b}
	ns, err := r.u32("n_stream")
	if err != nil {
		return nil, err
	}
	if ns == 0 || ns > maxStateStreams {
		return nil, fmt.Errorf("%w: n_stream=%d outside [1,%d]", ErrState, ns, maxStateStreams)
	}
	st := &SeqState{Streams: int(ns)}
	for s := range int(ns) {
		cc, err := r.u32(fmt.Sprintf("stream %d cell_count", s))
		if err != nil {
			return nil, err
		}
		if cc == 0 {
			continue
		}
		// Each cell takes at least 8 bytes: bound the count before allocating.
		if err := r.need(uint64(cc)*8, fmt.Sprintf("stream %d: %d cells", s, cc)); err != nil {
			return nil, err
		}
		first := len(st.Cells)
		for i := range int(cc) {
			pos, err := r.u32("cell pos")
			if err != nil {
				return nil, err
			}
			n, err := r.u32("cell n_seq")
			if err != nil {
				return nil, err
			}
			if n > maxStateSeqs {
				return nil, fmt.Errorf("%w: stream %d cell %d: n_seq=%d exceeds %d", ErrState, s, i, n, maxStateSeqs)
			}
			ids, err := r.span(uint64(n), 4, "cell seq ids")
			if err != nil {
				return nil, err
			}
			c := StateCell{Stream: s, Pos: hooks.Pos(int32(pos)), Seqs: make([]hooks.SeqID, n)}
			if c.Pos < 0 {
				return nil, fmt.Errorf("%w: stream %d cell %d: negative position %d", ErrState, s, i, c.Pos)
			}
			for j := range c.Seqs {
				c.Seqs[j] = hooks.SeqID(int32(binary.LittleEndian.Uint32(ids[4*j:])))
			}
			st.Cells = append(st.Cells, c)
		}
		vt, err := r.u32("v_trans")
		if err != nil {
			return nil, err
		}
		if vt > 1 {
			return nil, fmt.Errorf("%w: stream %d: v_trans=%d is not 0 or 1", ErrState, s, vt)
		}
		nl, err := r.u32("n_layer")
		if err != nil {
			return nil, err
		}
		if nl == 0 || nl > maxStateLayers {
			return nil, fmt.Errorf("%w: stream %d: n_layer=%d outside [1,%d]", ErrState, s, nl, maxStateLayers)
		}
		if st.Layers == nil {
			st.Layers = make([]StateLayer, nl)
			st.VTrans = vt == 1
		} else if int(nl) != len(st.Layers) || st.VTrans != (vt == 1) {
			return nil, fmt.Errorf("%w: stream %d: n_layer=%d v_trans=%d differ from an earlier stream (%d, %v)", ErrState, s, nl, vt, len(st.Layers), st.VTrans)
		}
		for l := range st.Layers {
			L := &st.Layers[l]
			kt, err := r.u32("k_type")
			if err != nil {
				return nil, err
			}
			rb, err := r.u64("k_row_bytes")
			if err != nil {
				return nil, err
			}
			if rb == 0 || rb > 1<<30 {
				return nil, fmt.Errorf("%w: stream %d layer %d: k_row_bytes=%d", ErrState, s, l, rb)
			}
			rows, err := r.span(uint64(cc), rb, fmt.Sprintf("stream %d layer %d K rows", s, l))
			if err != nil {
				return nil, err
			}
			if first > 0 && (int32(kt) != L.KType || int(rb) != L.RowBytes) {
				return nil, fmt.Errorf("%w: stream %d layer %d: k_type %d rows of %d bytes differ from an earlier stream", ErrState, s, l, kt, rb)
			}
			L.KType, L.RowBytes = int32(kt), int(rb)
			if L.Rows == nil {
				L.Rows = rows // capped: a later append copies
			} else {
				L.Rows = append(L.Rows, rows...)
			}
		}
		// Skip V, parsing it so the next stream is found.
		for l := range st.Layers {
			if _, err := r.u32("v_type"); err != nil {
				return nil, err
			}
			if !st.VTrans {
				rb, err := r.u64("v_row_bytes")
				if err != nil {
					return nil, err
				}
				if _, err := r.span(uint64(cc), rb, fmt.Sprintf("stream %d layer %d V rows", s, l)); err != nil {
					return nil, err
				}
				continue
			}
			el, err := r.u32("v_size_el")
			if err != nil {
				return nil, err
			}
			ne, err := r.u32("n_embd_v_gqa")
			if err != nil {
				return nil, err
			}
			hi, per := bits.Mul64(uint64(el), uint64(ne))
			if hi != 0 {
				return nil, fmt.Errorf("%w: stream %d layer %d: V size overflows", ErrState, s, l)
			}
			if _, err := r.span(per, uint64(cc), fmt.Sprintf("stream %d layer %d transposed V", s, l)); err != nil {
				return nil, err
			}
		}
	}
	if r.off != len(b) {
		return nil, fmt.Errorf("%w: %d trailing bytes after %d", ErrState, len(b)-r.off, r.off)
	}
	return st, nil
}

// KeyBatch returns layer l's keys as the cache stores them, for a cache of
// kvHeads heads, and the head dim (see keyBatch).
func (s *SeqState) KeyBatch(l, kvHeads int, seq hooks.SeqID) (*hooks.KeyBatch, int, error) {
	return s.keyBatch(l, kvHeads, seq)
}

// keyBatch returns layer l's keys as a hooks.KeyBatch for a cache of kvHeads
// heads: rows the kernels read per head are passed as they are, others (q8_0
// rows whose heads split a block) are dequantized to f32 first.
func (s *SeqState) keyBatch(l, kvHeads int, seq hooks.SeqID) (*hooks.KeyBatch, int, error) {
	if l < 0 || l >= len(s.Layers) {
		return nil, 0, fmt.Errorf("%w: layer %d outside %d layers", ErrState, l, len(s.Layers))
	}
	L := s.Layers[l]
	var dt kernels.DType
	var elems int
	switch L.KType {
	case ggmlF32:
		dt, elems = kernels.F32, L.RowBytes/4
		if L.RowBytes%4 != 0 {
			elems = -1
		}
	case ggmlF16, ggmlBF16:
		dt, elems = kernels.F16, L.RowBytes/2
		if L.KType == ggmlBF16 {
			dt = kernels.BF16
		}
		if L.RowBytes%2 != 0 {
			elems = -1
		}
	case ggmlQ8_0:
		dt, elems = kernels.Q8_0, L.RowBytes/34*32
		if L.RowBytes%34 != 0 {
			elems = -1
		}
	default:
		return nil, 0, fmt.Errorf("%w: layer %d: K cache of ggml type %d (%s): kvnorm reads f32, f16, bf16 and q8_0 keys", hooks.ErrUnsupported, l, L.KType, ggmlTypeName(L.KType))
	}
	if elems <= 0 || kvHeads <= 0 || elems%kvHeads != 0 {
		return nil, 0, fmt.Errorf("%w: layer %d: K rows of %d bytes (ggml type %d) do not split into %d heads", ErrState, l, L.RowBytes, L.KType, kvHeads)
	}
	headDim := elems / kvHeads
	if len(L.Rows) != len(s.Cells)*L.RowBytes {
		return nil, 0, fmt.Errorf("%w: layer %d: %d key bytes for %d cells of %d", ErrState, l, len(L.Rows), len(s.Cells), L.RowBytes)
	}
	b := &hooks.KeyBatch{Layer: l, Positions: s.Positions(), Seqs: make([]hooks.SeqID, len(s.Cells)), DType: dt, Keys: L.Rows}
	for i := range b.Seqs {
		b.Seqs[i] = seq
	}
	if rb, err := dt.RowBytes(headDim); err != nil || rb*kvHeads != L.RowBytes {
		// A q8_0 block spans several heads: dequantize the rows.
		f := make([]float32, len(s.Cells)*elems)
		dequantQ8_0(f, L.Rows)
		b.DType, b.Keys = kernels.F32, hooks.F32Bytes(f)
	}
	return b, headDim, nil
}

// dequantQ8_0 decodes q8_0 blocks (f16 scale, 32 int8) into dst.
func dequantQ8_0(dst []float32, src []byte) {
	for b := 0; b < len(src)/34 && (b+1)*32 <= len(dst); b++ {
		blk := src[b*34 : (b+1)*34]
		d := kernels.F16ToF32(binary.LittleEndian.Uint16(blk))
		for i := range 32 {
			dst[b*32+i] = d * float32(int8(blk[2+i]))
		}
	}
}

func ggmlTypeName(t int32) string {
	switch t {
	case ggmlF32:
		return "f32"
	case ggmlF16:
		return "f16"
	case ggmlQ4_0:
		return "q4_0"
	case ggmlQ8_0:
		return "q8_0"
	case ggmlBF16:
		return "bf16"
	}
	return "other"
}
