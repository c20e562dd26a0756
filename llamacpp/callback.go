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

// kvnormObserveKeys is called by kvn_cb_eval (context.go) on the thread
// running llama_decode, once the "Kcur-N" ROPE tensor of a layer is computed.
//
//export kvnormObserveKeys
func kvnormObserveKeys(handle C.uintptr_t, tensor unsafe.Pointer) {
	c, ok := cgo.Handle(handle).Value().(*Context)
	if !ok {
		panic("llamacpp: cb_eval user data is not a *Context")
	}
	c.observeTensor(tensor)
}
