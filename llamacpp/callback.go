//go:build cgo

package llamacpp

// This file holds the one //export'ed function. cgo copies the preamble of a
// file with //export into two C files, so it must hold declarations only.

/*
#include <stdint.h>
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// What kvn_cb_eval (context.go) hands over; the values of its KVN_* enum.
const (
	kindKeys  = 1 // a "Kcur-N" ROPE tensor
	kindAttn  = 2 // a "kq_soft_max-N" SOFT_MAX tensor
	kindCells = 4 // the SET_ROWS writing the batch into the K cache
)

// kvnormObserve is called by kvn_cb_eval (context.go) on the thread running
// llama_decode, once a tensor it asked for is computed.
//
//export kvnormObserve
func kvnormObserve(handle C.uintptr_t, kind C.int, tensor unsafe.Pointer) {
	c, ok := cgo.Handle(handle).Value().(*Context)
	if !ok {
		panic("llamacpp: cb_eval user data is not a *Context")
	}
	switch kind {
	case kindKeys:
		c.observeTensor(tensor)
	case kindAttn:
		c.observeAttention(tensor)
	case kindCells:
		c.observeCells(tensor)
	}
}
