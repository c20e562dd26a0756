//go:build amd64 && !noasm && !purego

#include "textflag.h"

// Layout shared by the four kernels (see the reference loops on the stubs in
// norms_amd64.go):
//
//	DI  next dst element           CX  rows left
//	SI  read cursor, row after row DX  dim (Q8_0: blocks per row)
//	R8  sqrt flag (0 or 1)         BX  elements (blocks) left in the row
//
// The rows are read strictly in memory order, one after the other, so the
// hardware prefetchers see a single stream. Each row is summed by a
// <TYPE>_ROW macro into four accumulators Y8..Y11 (temporaries Y12..Y14)
// that end up folded into one vector register. Rows go in groups of eight,
// their vectors kept in Y0..Y7, so that the eight horizontal sums cost the
// nine instructions of REDUCE8_STORE and one store; the last n%8 rows go one
// at a time through REDUCE1_STORE. Y15 holds a per-type constant.

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

// PFDIST is how far ahead of the read cursor the main row loops (32 elements
// or 2 blocks per iteration) prefetch: about twice the bytes that one memory
// latency's worth of bandwidth keeps in flight. Prefetches past the end of
// src are harmless: they never fault.
#define PFDIST 2048

#define LOAD_ARGS \
	MOVQ    dst_base+0(FP), DI  \
	MOVQ    dst_len+8(FP), CX   \
	MOVQ    src_base+24(FP), SI \
	MOVQ    dim+48(FP), DX      \
	MOVBLZX sqrt+56(FP), R8

#define ZERO_ACC \
	VXORPS Y8, Y8, Y8    \
	VXORPS Y9, Y9, Y9    \
	VXORPS Y10, Y10, Y10 \
	VXORPS Y11, Y11, Y11

// FOLD_ACC(dst) adds the four accumulators into dst.
#define FOLD_ACC(dst) \
	VADDPS Y9, Y8, Y8   \
	VADDPS Y11, Y10, Y10 \
	VADDPS Y10, Y8, dst

// REDUCE8_STORE(nosqrt) sums each of Y0..Y7 horizontally into lane r of Y0
// (row r of the group), takes the roots when R8 != 0, stores the eight
// results at (DI) and advances DI.
#define REDUCE8_STORE(nosqrt) \
	VHADDPS    Y1, Y0, Y0        \
	VHADDPS    Y3, Y2, Y2        \
	VHADDPS    Y5, Y4, Y4        \
	VHADDPS    Y7, Y6, Y6        \
	VHADDPS    Y2, Y0, Y0        \
	VHADDPS    Y6, Y4, Y4        \
	VPERM2F128 $0x20, Y4, Y0, Y1 \
	VPERM2F128 $0x31, Y4, Y0, Y2 \
	VADDPS     Y2, Y1, Y0        \
	TESTQ      R8, R8            \
	JZ         nosqrt            \
	VSQRTPS    Y0, Y0            \
nosqrt:                          \
	VMOVUPS    Y0, (DI)          \
	ADDQ       $32, DI

// REDUCE1_STORE(nosqrt) sums Y0 horizontally, takes the root when R8 != 0,
// stores the result at (DI) and advances DI.
#define REDUCE1_STORE(nosqrt) \
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

// ---- f32 ----

// F32_ROW(by32, by8, tail, done, dst): squares of the dim float32 at SI
// into the lanes of dst; SI ends past the row. The last dim%8 elements are
// read with a masked load, never beyond the row.
#define F32_ROW(by32, by8, tail, done, dst) \
	ZERO_ACC                    \
	MOVQ        DX, BX          \
	CMPQ        BX, $32         \
	JB          by8             \
by32:                           \
	PREFETCHT0  PFDIST(SI)      \
	PREFETCHT0  PFDIST+64(SI)   \
	VMOVUPS     (SI), Y12       \
	VMOVUPS     32(SI), Y13     \
	VMOVUPS     64(SI), Y14     \
	VFMADD231PS Y12, Y12, Y8    \
	VMOVUPS     96(SI), Y12     \
	VFMADD231PS Y13, Y13, Y9    \
	VFMADD231PS Y14, Y14, Y10   \
	VFMADD231PS Y12, Y12, Y11   \
	ADDQ        $128, SI        \
	SUBQ        $32, BX         \
	CMPQ        BX, $32         \
	JAE         by32            \
by8:                            \
	CMPQ        BX, $8          \
	JB          tail            \
	VMOVUPS     (SI), Y12       \
	VFMADD231PS Y12, Y12, Y9    \
	ADDQ        $32, SI         \
	SUBQ        $8, BX          \
	JMP         by8             \
tail:                           \
	TESTQ       BX, BX          \
	JZ          done            \
	LEAQ        maskTail<>+32(SB), R9 \
	MOVQ        BX, R10         \
	SHLQ        $2, R10         \
	SUBQ        R10, R9         \
	VMOVDQU     (R9), Y13       \
	VMASKMOVPS  (SI), Y13, Y12  \
	VFMADD231PS Y12, Y12, Y10   \
	ADDQ        R10, SI         \
done:                           \
	FOLD_ACC(dst)

// func normsF32AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsF32AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS

f32group:
	CMPQ CX, $8
	JB   f32one
	F32_ROW(f32a32, f32a8, f32at, f32ad, Y0)
	F32_ROW(f32b32, f32b8, f32bt, f32bd, Y1)
	F32_ROW(f32c32, f32c8, f32ct, f32cd, Y2)
	F32_ROW(f32d32, f32d8, f32dt, f32dd, Y3)
	F32_ROW(f32e32, f32e8, f32et, f32ed, Y4)
	F32_ROW(f32f32, f32f8, f32ft, f32fd, Y5)
	F32_ROW(f32g32, f32g8, f32gt, f32gd, Y6)
	F32_ROW(f32h32, f32h8, f32ht, f32hd, Y7)
	REDUCE8_STORE(f32nosqrt8)
	SUBQ $8, CX
	JMP  f32group

f32one:
	TESTQ CX, CX
	JZ    f32done
	F32_ROW(f32z32, f32z8, f32zt, f32zd, Y0)
	REDUCE1_STORE(f32nosqrt1)
	DECQ  CX
	JMP   f32one

f32done:
	VZEROUPPER
	RET

// ---- f16 ----

// F16_ROW(by32, by8, tail, done, dst): squares of the dim binary16 at SI,
// converted by VCVTPH2PS, into the lanes of dst; SI ends past the row. The
// last dim%8 elements go one at a time: VMOVD clears the other lanes, which
// convert to +0 and add nothing.
#define F16_ROW(by32, by8, tail, done, dst) \
	ZERO_ACC                    \
	MOVQ        DX, BX          \
	CMPQ        BX, $32         \
	JB          by8             \
by32:                           \
	PREFETCHT0  PFDIST(SI)      \
	VCVTPH2PS   (SI), Y12       \
	VCVTPH2PS   16(SI), Y13     \
	VCVTPH2PS   32(SI), Y14     \
	VFMADD231PS Y12, Y12, Y8    \
	VCVTPH2PS   48(SI), Y12     \
	VFMADD231PS Y13, Y13, Y9    \
	VFMADD231PS Y14, Y14, Y10   \
	VFMADD231PS Y12, Y12, Y11   \
	ADDQ        $64, SI         \
	SUBQ        $32, BX         \
	CMPQ        BX, $32         \
	JAE         by32            \
by8:                            \
	CMPQ        BX, $8          \
	JB          tail            \
	VCVTPH2PS   (SI), Y12       \
	VFMADD231PS Y12, Y12, Y9    \
	ADDQ        $16, SI         \
	SUBQ        $8, BX          \
	JMP         by8             \
tail:                           \
	TESTQ       BX, BX          \
	JZ          done            \
	MOVWLZX     (SI), R9        \
	VMOVD       R9, X12         \
	VCVTPH2PS   X12, Y12        \
	VFMADD231PS Y12, Y12, Y10   \
	ADDQ        $2, SI          \
	DECQ        BX              \
	JMP         tail            \
done:                           \
	FOLD_ACC(dst)

// func normsF16AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsF16AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS

f16group:
	CMPQ CX, $8
	JB   f16one
	F16_ROW(f16a32, f16a8, f16at, f16ad, Y0)
	F16_ROW(f16b32, f16b8, f16bt, f16bd, Y1)
	F16_ROW(f16c32, f16c8, f16ct, f16cd, Y2)
	F16_ROW(f16d32, f16d8, f16dt, f16dd, Y3)
	F16_ROW(f16e32, f16e8, f16et, f16ed, Y4)
	F16_ROW(f16f32, f16f8, f16ft, f16fd, Y5)
	F16_ROW(f16g32, f16g8, f16gt, f16gd, Y6)
	F16_ROW(f16h32, f16h8, f16ht, f16hd, Y7)
	REDUCE8_STORE(f16nosqrt8)
	SUBQ $8, CX
	JMP  f16group

f16one:
	TESTQ CX, CX
	JZ    f16done
	F16_ROW(f16z32, f16z8, f16zt, f16zd, Y0)
	REDUCE1_STORE(f16nosqrt1)
	DECQ  CX
	JMP   f16one

f16done:
	VZEROUPPER
	RET

// ---- bf16 ----

// BF16_ROW(by32, by8, tail, done, dst): squares of the dim bfloat16 at SI
// into the lanes of dst; SI ends past the row. A bfloat16 is the upper half
// of a float32: loading 16 of them as eight 32-bit lanes, x<<16 gives the
// even elements and x&0xffff0000 (Y15) the odd ones, and the sum of squares
// does not care about the order.
#define BF16_ROW(by32, by8, tail, done, dst) \
	ZERO_ACC                    \
	MOVQ        DX, BX          \
	CMPQ        BX, $32         \
	JB          by8             \
by32:                           \
	PREFETCHT0  PFDIST(SI)      \
	VMOVDQU     (SI), Y12       \
	VMOVDQU     32(SI), Y13     \
	VPSLLD      $16, Y12, Y14   \
	VPAND       Y15, Y12, Y12   \
	VFMADD231PS Y12, Y12, Y8    \
	VFMADD231PS Y14, Y14, Y9    \
	VPSLLD      $16, Y13, Y14   \
	VPAND       Y15, Y13, Y13   \
	VFMADD231PS Y13, Y13, Y10   \
	VFMADD231PS Y14, Y14, Y11   \
	ADDQ        $64, SI         \
	SUBQ        $32, BX         \
	CMPQ        BX, $32         \
	JAE         by32            \
by8:                            \
	CMPQ        BX, $8          \
	JB          tail            \
	VPMOVZXWD   (SI), Y12       \
	VPSLLD      $16, Y12, Y12   \
	VFMADD231PS Y12, Y12, Y9    \
	ADDQ        $16, SI         \
	SUBQ        $8, BX          \
	JMP         by8             \
tail:                           \
	TESTQ       BX, BX          \
	JZ          done            \
	MOVWLZX     (SI), R9        \
	SHLL        $16, R9         \
	VMOVD       R9, X12         \
	VFMADD231PS Y12, Y12, Y10   \
	ADDQ        $2, SI          \
	DECQ        BX              \
	JMP         tail            \
done:                           \
	FOLD_ACC(dst)

// func normsBF16AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsBF16AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	VPCMPEQD Y15, Y15, Y15
	VPSLLD   $16, Y15, Y15 // 0xffff0000 in every lane

bf16group:
	CMPQ CX, $8
	JB   bf16one
	BF16_ROW(bf16a32, bf16a8, bf16at, bf16ad, Y0)
	BF16_ROW(bf16b32, bf16b8, bf16bt, bf16bd, Y1)
	BF16_ROW(bf16c32, bf16c8, bf16ct, bf16cd, Y2)
	BF16_ROW(bf16d32, bf16d8, bf16dt, bf16dd, Y3)
	BF16_ROW(bf16e32, bf16e8, bf16et, bf16ed, Y4)
	BF16_ROW(bf16f32, bf16f8, bf16ft, bf16fd, Y5)
	BF16_ROW(bf16g32, bf16g8, bf16gt, bf16gd, Y6)
	BF16_ROW(bf16h32, bf16h8, bf16ht, bf16hd, Y7)
	REDUCE8_STORE(bf16nosqrt8)
	SUBQ $8, CX
	JMP  bf16group

bf16one:
	TESTQ CX, CX
	JZ    bf16done
	BF16_ROW(bf16z32, bf16z8, bf16zt, bf16zd, Y0)
	REDUCE1_STORE(bf16nosqrt1)
	DECQ  CX
	JMP   bf16one

bf16done:
	VZEROUPPER
	RET

// ---- q8_0 ----

// Q8_0_BLOCK(acc) adds the 34-byte block at SI to acc and advances SI. The
// 32 int8 are widened to int16 and squared and pair-summed by VPMADDWD,
// giving exact int32 lane sums of q². The f16 scale d is broadcast and
// converted, and d² is cleared in the lanes whose sum is 0 (Y15 is zero),
// so that an all-zero block adds 0 even with an Inf or NaN scale. Then
// acc += d² * float32(lane sums).
#define Q8_0_BLOCK(acc) \
	VPMOVSXBW    2(SI), Y12   \
	VPMOVSXBW    18(SI), Y13  \
	VPBROADCASTW (SI), X14    \
	VPMADDWD     Y12, Y12, Y12 \
	VPMADDWD     Y13, Y13, Y13 \
	VCVTPH2PS    X14, Y14     \
	VPADDD       Y13, Y12, Y12 \
	VMULPS       Y14, Y14, Y14 \
	VPCMPEQD     Y15, Y12, Y13 \
	VCVTDQ2PS    Y12, Y12     \
	VANDNPS      Y14, Y13, Y14 \
	VFMADD231PS  Y12, Y14, acc \
	ADDQ         $34, SI

// Q8_0_ROW(by2, by1, done, dst): the DX blocks at SI into the lanes of dst;
// SI ends past the row.
#define Q8_0_ROW(by2, by1, done, dst) \
	ZERO_ACC                \
	MOVQ        DX, BX      \
	CMPQ        BX, $2      \
	JB          by1         \
by2:                        \
	PREFETCHT0  PFDIST(SI)  \
	Q8_0_BLOCK(Y8)          \
	Q8_0_BLOCK(Y9)          \
	SUBQ        $2, BX      \
	CMPQ        BX, $2      \
	JAE         by2         \
by1:                        \
	TESTQ       BX, BX      \
	JZ          done        \
	Q8_0_BLOCK(Y10)         \
done:                       \
	FOLD_ACC(dst)

// func normsQ8_0AVX2(dst []float32, src []byte, dim int, sqrt bool)
TEXT ·normsQ8_0AVX2(SB), NOSPLIT, $0-57
	LOAD_ARGS
	SHRQ  $5, DX // blocks per row
	VPXOR Y15, Y15, Y15

q8group:
	CMPQ CX, $8
	JB   q8one
	Q8_0_ROW(q8a2, q8a1, q8ad, Y0)
	Q8_0_ROW(q8b2, q8b1, q8bd, Y1)
	Q8_0_ROW(q8c2, q8c1, q8cd, Y2)
	Q8_0_ROW(q8d2, q8d1, q8dd, Y3)
	Q8_0_ROW(q8e2, q8e1, q8ed, Y4)
	Q8_0_ROW(q8f2, q8f1, q8fd, Y5)
	Q8_0_ROW(q8g2, q8g1, q8gd, Y6)
	Q8_0_ROW(q8h2, q8h1, q8hd, Y7)
	REDUCE8_STORE(q8nosqrt8)
	SUBQ $8, CX
	JMP  q8group

q8one:
	TESTQ CX, CX
	JZ    q8done
	Q8_0_ROW(q8z2, q8z1, q8zd, Y0)
	REDUCE1_STORE(q8nosqrt1)
	DECQ  CX
	JMP   q8one

q8done:
	VZEROUPPER
	RET
