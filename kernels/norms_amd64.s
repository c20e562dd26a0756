//go:build amd64 && !noasm && !purego

#include "textflag.h"

// Register use shared by the four kernels:
//
//	DI  next dst element        CX  rows left
//	SI  start of the current row (then of the next)
//	DX  dim                     R8  sqrt flag (0 or 1)
//	AX  read cursor in the row  BX  elements (or blocks) left in the row
//	Y0..Y3  float32 accumulators of the row
//
// Each row ends with REDUCE_STORE: the four accumulators are added, summed
// horizontally, optionally square-rooted, and stored to (DI).

// maskTail holds eight all-ones lanes then eight zero lanes. Loading 8 lanes
// from maskTail+32-4*t gives a VMASKMOVPS mask selecting the first t lanes.
DATA maskTail<>+0x00(SB)/8, $0xffffffffffffffff
DATA maskTail<>+0x08(SB)/8, $0xffffffffffffffff
DATA maskTail<>+0x10(SB)/8, $0xffffffffffffffff
DATA maskTail<>+0x18(SB)/8, $0xffffffffffffffff
DATA maskTail<>+0x20(SB)/8, $0
DATA maskTail<>+0x28(SB)/8, $0
DATA maskTail<>+0x30(SB)/8, $0
DATA maskTail<>+0x38(SB)/8, $0
GLOBL maskTail<>(SB), RODATA|NOPTR, $64

#define LOAD_ARGS \
	MOVQ    dst_base+0(FP), DI \
	MOVQ    dst_len+8(FP), CX  \
	MOVQ    src_base+24(FP), SI \
	MOVQ    dim+48(FP), DX     \
	MOVBLZX sqrt+56(FP), R8

#define ZERO_ACC \
	VXORPS Y0, Y0, Y0 \
	VXORPS Y1, Y1, Y1 \
	VXORPS Y2, Y2, Y2 \
	VXORPS Y3, Y3, Y3

// REDUCE_STORE(label) sums Y0..Y3 into one float32, takes its root when
// R8 != 0, stores it to (DI) and advances DI. label must be unique.
#define REDUCE_STORE(nosqrt) \
	VADDPS       Y1, Y0, Y0 \
	VADDPS       Y3, Y2, Y2 \
	VADDPS       Y2, Y0, Y0 \
	VEXTRACTF128 $1, Y0, X1 \
	VADDPS       X1, X0, X0 \
	VMOVHLPS     X0, X0, X1 \
	VADDPS       X1, X0, X0 \
	VMOVSHDUP    X0, X1     \
	VADDSS       X1, X0, X0 \
	TESTQ        R8, R8     \
	JZ           nosqrt     \
	VSQRTSS      X0, X0, X0 \
nosqrt:                     \
	VMOVSS       X0, (DI)   \
	ADDQ         $4, DI

// func normsF32AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsF32AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	TESTQ CX, CX
	JZ    f32done

f32row:
	ZERO_ACC
	MOVQ SI, AX
	MOVQ DX, BX
	CMPQ BX, $32
	JB   f32by8

f32by32:
	VMOVUPS     (AX), Y4
	VMOVUPS     32(AX), Y5
	VMOVUPS     64(AX), Y6
	VMOVUPS     96(AX), Y7
	VFMADD231PS Y4, Y4, Y0
	VFMADD231PS Y5, Y5, Y1
	VFMADD231PS Y6, Y6, Y2
	VFMADD231PS Y7, Y7, Y3
	ADDQ        $128, AX
	SUBQ        $32, BX
	CMPQ        BX, $32
	JAE         f32by32

f32by8:
	CMPQ        BX, $8
	JB          f32tail
	VMOVUPS     (AX), Y4
	VFMADD231PS Y4, Y4, Y0
	ADDQ        $32, AX
	SUBQ        $8, BX
	JMP         f32by8

f32tail:
	// 0..7 elements left: a masked load reads only those.
	TESTQ       BX, BX
	JZ          f32reduce
	LEAQ        maskTail<>+32(SB), R9
	MOVQ        BX, R10
	SHLQ        $2, R10
	SUBQ        R10, R9
	VMOVDQU     (R9), Y8
	VMASKMOVPS  (AX), Y8, Y4
	VFMADD231PS Y4, Y4, Y1
	ADDQ        R10, AX

f32reduce:
	REDUCE_STORE(f32nosqrt)
	MOVQ AX, SI
	DECQ CX
	JNZ  f32row

f32done:
	VZEROUPPER
	RET

// func normsF16AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsF16AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	TESTQ CX, CX
	JZ    f16done

f16row:
	ZERO_ACC
	MOVQ SI, AX
	MOVQ DX, BX
	CMPQ BX, $32
	JB   f16by8

f16by32:
	VCVTPH2PS   (AX), Y4
	VCVTPH2PS   16(AX), Y5
	VCVTPH2PS   32(AX), Y6
	VCVTPH2PS   48(AX), Y7
	VFMADD231PS Y4, Y4, Y0
	VFMADD231PS Y5, Y5, Y1
	VFMADD231PS Y6, Y6, Y2
	VFMADD231PS Y7, Y7, Y3
	ADDQ        $64, AX
	SUBQ        $32, BX
	CMPQ        BX, $32
	JAE         f16by32

f16by8:
	CMPQ        BX, $8
	JB          f16tail
	VCVTPH2PS   (AX), Y4
	VFMADD231PS Y4, Y4, Y0
	ADDQ        $16, AX
	SUBQ        $8, BX
	JMP         f16by8

f16tail:
	// 0..7 elements left, one at a time. VMOVD clears the other lanes, which
	// convert to +0 and add nothing.
	TESTQ       BX, BX
	JZ          f16reduce
	MOVWLZX     (AX), R9
	VMOVD       R9, X4
	VCVTPH2PS   X4, Y4
	VFMADD231PS Y4, Y4, Y1
	ADDQ        $2, AX
	DECQ        BX
	JMP         f16tail

f16reduce:
	REDUCE_STORE(f16nosqrt)
	MOVQ AX, SI
	DECQ CX
	JNZ  f16row

f16done:
	VZEROUPPER
	RET

// func normsBF16AVX2(dst []float32, src []byte, dim int, sqrt bool)
//
// A bfloat16 is the upper half of a float32. Loading 16 of them as eight
// 32-bit lanes, x<<16 gives the even elements as float32 and x&0xffff0000 the
// odd ones; the sum of squares does not care about the order.
TEXT ·normsBF16AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	TESTQ   CX, CX
	JZ      bf16done
	VPCMPEQD Y15, Y15, Y15
	VPSLLD  $16, Y15, Y15 // 0xffff0000 in every lane

bf16row:
	ZERO_ACC
	MOVQ SI, AX
	MOVQ DX, BX
	CMPQ BX, $32
	JB   bf16by16

bf16by32:
	VMOVDQU     (AX), Y4
	VMOVDQU     32(AX), Y6
	VPSLLD      $16, Y4, Y5
	VPAND       Y15, Y4, Y4
	VPSLLD      $16, Y6, Y7
	VPAND       Y15, Y6, Y6
	VFMADD231PS Y4, Y4, Y0
	VFMADD231PS Y5, Y5, Y1
	VFMADD231PS Y6, Y6, Y2
	VFMADD231PS Y7, Y7, Y3
	ADDQ        $64, AX
	SUBQ        $32, BX
	CMPQ        BX, $32
	JAE         bf16by32

bf16by16:
	CMPQ        BX, $16
	JB          bf16by8
	VMOVDQU     (AX), Y4
	VPSLLD      $16, Y4, Y5
	VPAND       Y15, Y4, Y4
	VFMADD231PS Y4, Y4, Y0
	VFMADD231PS Y5, Y5, Y1
	ADDQ        $32, AX
	SUBQ        $16, BX

bf16by8:
	CMPQ        BX, $8
	JB          bf16tail
	VPMOVZXWD   (AX), Y4
	VPSLLD      $16, Y4, Y4
	VFMADD231PS Y4, Y4, Y2
	ADDQ        $16, AX
	SUBQ        $8, BX

bf16tail:
	TESTQ       BX, BX
	JZ          bf16reduce
	MOVWLZX     (AX), R9
	SHLL        $16, R9
	VMOVD       R9, X4
	VFMADD231PS Y4, Y4, Y3
	ADDQ        $2, AX
	DECQ        BX
	JMP         bf16tail

bf16reduce:
	REDUCE_STORE(bf16nosqrt)
	MOVQ AX, SI
	DECQ CX
	JNZ  bf16row

bf16done:
	VZEROUPPER
	RET

// Q8_0_BLOCK(off, acc) adds the block at off(AX) to acc: the f16 scale d is
// broadcast and converted, d² is masked to 0 in the lanes whose integer sum
// of q² is 0 (so an all-zero block adds 0 even with an Inf or NaN scale),
// then acc += d² * float32(Σq²). Uses Y4..Y7; Y15 must be zero.
#define Q8_0_BLOCK(off, acc) \
	VPMOVSXBW    off+2(AX), Y5  \
	VPMOVSXBW    off+18(AX), Y6 \
	VPBROADCASTW off(AX), X4    \
	VPMADDWD     Y5, Y5, Y5     \
	VPMADDWD     Y6, Y6, Y6     \
	VCVTPH2PS    X4, Y4         \
	VPADDD       Y6, Y5, Y5     \
	VMULPS       Y4, Y4, Y4     \
	VPCMPEQD     Y15, Y5, Y7    \
	VCVTDQ2PS    Y5, Y5         \
	VANDNPS      Y4, Y7, Y4     \
	VFMADD231PS  Y5, Y4, acc

// func normsQ8_0AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsQ8_0AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	TESTQ  CX, CX
	JZ     q8done
	SHRQ   $5, DX // blocks per row
	VPXOR  Y15, Y15, Y15

q8row:
	ZERO_ACC
	MOVQ SI, AX
	MOVQ DX, BX
	CMPQ BX, $2
	JB   q8by1

q8by2:
	Q8_0_BLOCK(0, Y0)
	Q8_0_BLOCK(34, Y1)
	ADDQ $68, AX
	SUBQ $2, BX
	CMPQ BX, $2
	JAE  q8by2

q8by1:
	TESTQ BX, BX
	JZ    q8reduce
	Q8_0_BLOCK(0, Y2)
	ADDQ  $34, AX

q8reduce:
	REDUCE_STORE(q8nosqrt)
	MOVQ AX, SI
	DECQ CX
	JNZ  q8row

q8done:
	VZEROUPPER
	RET
