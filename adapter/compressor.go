package adapter

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kvnorm/kvnorm/hooks"
	"github.com/kvnorm/kvnorm/kernels"
)

// Compressor is the compressor every runtime shares. A runtime reports keys
// and events to it (it implements hooks.Observer); it keeps the key norms of
// every sequence, plans by its Policy, and applies plans through the runtime's
// PositionEvictor or HeadCompactor. It is safe for concurrent use.
type Compressor struct {
	mu      sync.Mutex
	policy  Policy
	shape   hooks.CacheShape
	entry   int64
	evictor hooks.PositionEvictor
	compact hooks.HeadCompactor
	// deferred, when the runtime holds keys back, is asked for them before
	// every plan.
	deferred hooks.DeferredKeys
	// epochs, when the runtime counts clears, guards plans against a
	// sequence cleared while they were made.
	epochs hooks.SequenceEpochs
	seqs   map[hooks.SeqID]*Record
	// busy serialises compressions of one sequence; they run without mu
	// while the runtime applies a plan.
	busy    map[hooks.SeqID]*sync.Mutex
	norms   []float32
	totals  Totals
	onStats func(hooks.Stats)
}

var _ hooks.Observer = (*Compressor)(nil)

// Totals add up every compression a Compressor applied.
type Totals struct {
	Compressions  int           `json:"compressions"`
	EntriesFreed  int64         `json:"entries_freed"`
	BytesFreed    int64         `json:"bytes_freed"`
	PlanTime      time.Duration `json:"plan_ns"`
	ApplyTime     time.Duration `json:"apply_ns"`
	ObserveTime   time.Duration `json:"observe_ns"`
	ObservedBytes int64         `json:"observed_bytes"`
}

// New returns a compressor for a runtime. The runtime must implement
// hooks.PositionEvictor or hooks.HeadCompactor; per-head policies need a
// HeadCompactor.
func New(rt hooks.Runtime, p Policy) (*Compressor, error) {
	if rt == nil {
		return nil, errors.New("adapter: nil runtime")
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	shape := rt.CacheShape()
	if err := shape.Validate(); err != nil {
		return nil, err
	}
	entry, err := shape.EntryBytes()
	if err != nil {
		return nil, err
	}
	c := &Compressor{policy: p, shape: shape, entry: entry, seqs: map[hooks.SeqID]*Record{}, busy: map[hooks.SeqID]*sync.Mutex{}}
	c.evictor, _ = rt.(hooks.PositionEvictor)
	c.compact, _ = rt.(hooks.HeadCompactor)
	c.deferred, _ = rt.(hooks.DeferredKeys)
	if c.evictor != nil {
		c.epochs, _ = rt.(hooks.SequenceEpochs)
	}
	switch {
	case c.evictor == nil && c.compact == nil:
		return nil, fmt.Errorf("%w: runtime %T implements neither PositionEvictor nor HeadCompactor", hooks.ErrUnsupported, rt)
	case p.Granularity == hooks.PerHead && c.compact == nil:
		return nil, fmt.Errorf("%w: granularity=per-head needs a runtime that compacts each head; %T shares cells across heads: use per-token", hooks.ErrUnsupported, rt)
	}
	return c, nil
}

// Policy returns the compressor's policy.
func (c *Compressor) Policy() Policy { return c.policy }

// OnStats registers f to receive the stats of every compression (it is
// called with the compressor's lock held: keep it short).
func (c *Compressor) OnStats(f func(hooks.Stats)) {
	c.mu.Lock()
	c.onStats = f
	c.mu.Unlock()
}

// Totals returns the sums over every compression so far.
func (c *Compressor) Totals() Totals {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.totals
}

// ObserveKeys records the norms of one layer of one batch. Keys are reduced
// to norms at once and never kept.
func (c *Compressor) ObserveKeys(b *hooks.KeyBatch) error {
	if b == nil {
		return fmt.Errorf("%w: nil batch", hooks.ErrBadBatch)
	}
	if err := b.Validate(c.shape); err != nil {
		return err
	}
	start := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	norms := b.Norms
	if norms == nil {
		c.norms = grow(c.norms, b.Len()*c.shape.KVHeads)
		norms = c.norms
		if err := kernels.Norms(norms, b.Keys, b.DType, c.shape.HeadDim); err != nil {
			return fmt.Errorf("%w: layer %d: %w", hooks.ErrBadBatch, b.Layer, err)
		}
		c.totals.ObservedBytes += int64(len(b.Keys))
	}
	h := c.shape.KVHeads
	for i := 0; i < b.Len(); {
		// Runs of tokens of one sequence go in together.
		j := i + 1
		for j < b.Len() && b.Seqs[j] == b.Seqs[i] {
			j++
		}
		r, err := c.record(b.Seqs[i])
		if err != nil {
			return err
		}
		if err := r.PutNorms(b.Layer, b.Positions[i:j], norms[i*h:j*h]); err != nil {
			return err
		}
		i = j
	}
	c.totals.ObserveTime += time.Since(start)
	return nil
}

func (c *Compressor) record(seq hooks.SeqID) (*Record, error) {
	r := c.seqs[seq]
	if r == nil {
		var err error
		if r, err = NewRecord(c.shape); err != nil {
			return nil, err
		}
		c.seqs[seq] = r
	}
	return r, nil
}

// PrefillDone compresses seq to the policy's budget, unless its prompt is
// shorter than the policy's MinPrompt.
func (c *Compressor) PrefillDone(seq hooks.SeqID) (hooks.Stats, error) {
	return c.run(seq, hooks.TriggerPrefill, func(r *Record) (int, bool, bool, error) {
		return -1, false, r.MaxLaneLen() < c.policy.MinPrompt, nil
	})
}

// CachePressure frees room for incoming tokens of seq when only free cells
// remain: it compresses seq by what is missing plus the policy's reserve.
// It returns an error when the protected positions alone leave no room.
func (c *Compressor) CachePressure(seq hooks.SeqID, free, incoming int) (hooks.Stats, error) {
	if free < 0 || incoming < 0 {
		return hooks.Stats{}, fmt.Errorf("adapter: cache pressure on seq %d: free=%d incoming=%d must be >= 0", seq, free, incoming)
	}
	return c.run(seq, hooks.TriggerPressure, func(r *Record) (int, bool, bool, error) {
		if incoming <= free {
			return 0, false, true, nil
		}
		live := r.MaxLaneLen()
		reserve := c.policy.Reserve
		if reserve == 0 {
			reserve = max(1, live/16)
		}
		target := live - (incoming - free) - reserve
		if prot := c.policy.protectedCount(live); target < prot {
			// Without the reserve it may still fit.
			target = live - (incoming - free)
			if target < prot {
				return 0, false, false, fmt.Errorf("adapter: cache pressure on seq %d: %d incoming tokens need %d cells but only %d are free and %d of %d live positions are protected (sinks %d, window %d)",
					seq, incoming, incoming-free, free, prot, live, c.policy.Sinks, c.policy.Window)
			}
		}
		return target, true, false, nil
	})
}

// Compress compresses seq to target positions per head on the application's
// request; target < 0 uses the policy's budget.
func (c *Compressor) Compress(seq hooks.SeqID, target int) (hooks.Stats, error) {
	return c.run(seq, hooks.TriggerExplicit, func(*Record) (int, bool, bool, error) { return target, false, false, nil })
}

// PlanFor returns the plan Compress(seq, target) would apply, without applying it.
func (c *Compressor) PlanFor(seq hooks.SeqID, target int) (*Plan, error) {
	if err := c.reportDeferred(seq); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	r, err := c.known(seq)
	if err != nil {
		return nil, err
	}
	return c.policy.Plan(r, seq, target, false)
}

// Forget drops positions [from, to) of seq that the runtime removed itself;
// to < 0 means to the end.
func (c *Compressor) Forget(seq hooks.SeqID, from, to hooks.Pos) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.seqs[seq]; r != nil {
		r.Forget(from, to)
	}
}

// DropSequence forgets everything about seq.
func (c *Compressor) DropSequence(seq hooks.SeqID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.seqs, seq)
	delete(c.busy, seq)
}

// Live returns the live positions of seq as recorded and the number of live
// (layer, head, position) entries.
func (c *Compressor) Live(seq hooks.SeqID) ([]hooks.Pos, int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.seqs[seq]
	if r == nil {
		return nil, 0
	}
	return r.Positions(), r.Entries()
}

// Norms returns a copy of the recorded positions and key norms of (layer,
// head) of seq.
func (c *Compressor) Norms(seq hooks.SeqID, layer, head int) ([]hooks.Pos, []float32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, err := c.known(seq)
	if err != nil {
		return nil, nil, err
	}
	if layer < 0 || layer >= c.shape.Layers || head < 0 || head >= c.shape.KVHeads {
		return nil, nil, fmt.Errorf("adapter: (layer %d, head %d) outside %d layers × %d kv heads", layer, head, c.shape.Layers, c.shape.KVHeads)
	}
	p, n := r.Lane(layer, head)
	return append([]hooks.Pos(nil), p...), append([]float32(nil), n...), nil
}

func (c *Compressor) known(seq hooks.SeqID) (*Record, error) {
	r := c.seqs[seq]
	if r == nil || r.Entries() == 0 {
		return nil, fmt.Errorf("%w: no keys recorded for seq %d (did the runtime report its keys?)", hooks.ErrUnknownSequence, seq)
	}
	return r, nil
}

func (c *Compressor) baseStats(seq hooks.SeqID, r *Record, t hooks.Trigger) hooks.Stats {
	n := len(r.Positions())
	e := r.Entries()
	return hooks.Stats{
		Seq: seq, Trigger: t.String(), Policy: c.policy.String(), Granularity: c.policy.Granularity.String(),
		PositionsBefore: n, PositionsAfter: n, EntriesBefore: e, EntriesAfter: e,
	}
}

// run makes one compression of seq: decide gives the target, whether
// skipped layers are forced, or that nothing is to be done. The plan is made
// under the lock; the runtime applies it without the lock, since a runtime
// calls ObserveKeys with its own lock held while it decodes (holding ours
// across its EvictPositions would invert the lock order); then the evicted
// positions are forgotten. Compressions of one sequence are serialised.
func (c *Compressor) run(seq hooks.SeqID, t hooks.Trigger, decide func(r *Record) (target int, force, skip bool, err error)) (hooks.Stats, error) {
	c.mu.Lock()
	busy := c.busy[seq]
	if busy == nil {
		busy = &sync.Mutex{}
		c.busy[seq] = busy
	}
	c.mu.Unlock()
	busy.Lock()
	defer busy.Unlock()
	if err := c.reportDeferred(seq); err != nil {
		return hooks.Stats{Seq: seq, Trigger: t.String(), Policy: c.policy.String(), Granularity: c.policy.Granularity.String()}, err
	}
	var epoch uint64
	if c.epochs != nil {
		epoch = c.epochs.SeqEpoch(seq)
	}

	c.mu.Lock()
	r, err := c.known(seq)
	if err != nil {
		c.mu.Unlock()
		return hooks.Stats{}, err
	}
	st := c.baseStats(seq, r, t)
	target, force, skip, err := decide(r)
	if err != nil || skip {
		c.mu.Unlock()
		st.Skipped = skip
		return st, err
	}
	start := time.Now()
	plan, err := c.policy.Plan(r, seq, target, force)
	if err != nil {
		c.mu.Unlock()
		return st, err
	}
	evicted := r.evicted(plan)
	st.PlanTime = time.Since(start)
	c.mu.Unlock()
	if len(evicted) == 0 {
		st.Skipped = true
		return st, nil
	}

	start = time.Now()
	if err := c.apply(plan, epoch); err != nil {
		return st, err
	}
	st.ApplyTime = time.Since(start)

	c.mu.Lock()
	if c.seqs[seq] == r {
		r.drop(evicted)
	}
	st.PositionsAfter = len(r.Positions())
	var freed int64
	for _, ev := range evicted {
		freed += int64(len(ev))
	}
	st.EntriesAfter = st.EntriesBefore - freed
	st.BytesFreed = freed * c.entry
	c.totals.Compressions++
	c.totals.EntriesFreed += freed
	c.totals.BytesFreed += st.BytesFreed
	c.totals.PlanTime += st.PlanTime
	c.totals.ApplyTime += st.ApplyTime
	onStats := c.onStats
	c.mu.Unlock()
	if onStats != nil {
		onStats(st)
	}
	return st, nil
}

// reportDeferred asks a runtime that holds keys back for those of seq
// (without c.mu: the runtime reports them through ObserveKeys).
func (c *Compressor) reportDeferred(seq hooks.SeqID) error {
	if c.deferred == nil {
		return nil
	}
	if err := c.deferred.ReportDeferredKeys(seq, c); err != nil {
		return fmt.Errorf("adapter: seq %d: keys the runtime held back: %w", seq, err)
	}
	return nil
}

// apply hands the plan to the runtime (epoch: the sequence's when planned).
func (c *Compressor) apply(plan *Plan, epoch uint64) error {
	switch {
	case plan.Token != nil && c.epochs != nil:
		if err := c.epochs.EvictPositionsInEpoch(plan.Token.Seq, epoch, plan.Token.Evict); err != nil {
			return fmt.Errorf("adapter: evict %d positions of seq %d: %w", len(plan.Token.Evict), plan.Token.Seq, err)
		}
	case plan.Token != nil && c.evictor != nil:
		if err := c.evictor.EvictPositions(plan.Token.Seq, plan.Token.Evict); err != nil {
			return fmt.Errorf("adapter: evict %d positions of seq %d: %w", len(plan.Token.Evict), plan.Token.Seq, err)
		}
	case plan.Token != nil:
		hp := TokenToHeadPlan(plan.Token, c.shape)
		if err := c.compact.CompactHeads(hp); err != nil {
			return fmt.Errorf("adapter: compact seq %d: %w", hp.Seq, err)
		}
	default:
		if err := c.compact.CompactHeads(plan.Head); err != nil {
			return fmt.Errorf("adapter: compact seq %d: %w", plan.Head.Seq, err)
		}
	}
	return nil
}

// TokenToHeadPlan expresses a per-token plan as a per-head plan in which every
// head of every layer keeps the same positions.
func TokenToHeadPlan(p *hooks.TokenPlan, shape hooks.CacheShape) *hooks.HeadPlan {
	hp := &hooks.HeadPlan{Seq: p.Seq, Layers: make([][][]hooks.Pos, shape.Layers)}
	for l := range hp.Layers {
		heads := make([][]hooks.Pos, shape.KVHeads)
		for h := range heads {
			heads[h] = p.Keep
		}
		hp.Layers[l] = heads
	}
	return hp
}
