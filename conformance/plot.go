package conformance

import (
	"cmp"
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/palette/moreland"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// WritePlots draws, for every runtime, each sweep task's main metric against
// the keep ratio (a line per policy and granularity: solid per-head, dashed
// per-token; the baseline dotted grey) and the attention analysis per
// layer. It returns the PNG paths it wrote.
func WritePlots(dir string, res *Results) ([]string, error) {
	var files []string
	for _, rr := range res.Runtimes {
		for i := range rr.Tasks {
			tr := &rr.Tasks[i]
			if tr.Status != StatusOK {
				continue
			}
			var (
				p   *plot.Plot
				err error
			)
			if tr.Task == TaskAttention {
				if p, err = attentionHeatmap(rr.Runtime, tr.Attention); err == nil && p != nil {
					path := filepath.Join(dir, fileStem(rr.Runtime, tr.Task)+"-heatmap.png")
					if err := p.Save(12*vg.Centimeter, 10*vg.Centimeter, path); err != nil {
						return files, fmt.Errorf("conformance: save %s: %w", path, err)
					}
					files = append(files, path)
				}
				if err == nil {
					p, err = attentionPlot(rr.Runtime, tr.Attention)
				}
			} else {
				p, err = sweepPlot(rr.Runtime, tr)
			}
			if err != nil {
				return files, fmt.Errorf("conformance: plot %s %s: %w", rr.Runtime, tr.Task, err)
			}
			if p == nil {
				continue
			}
			path := filepath.Join(dir, fileStem(rr.Runtime, tr.Task)+".png")
			if err := p.Save(16*vg.Centimeter, 11*vg.Centimeter, path); err != nil {
				return files, fmt.Errorf("conformance: save %s: %w", path, err)
			}
			files = append(files, path)
		}
	}
	return files, nil
}

func sweepPlot(runtime string, tr *TaskResult) (*plot.Plot, error) {
	// Perplexity is drawn as the relative increase over the baseline with
	// its paired interval: the spread of perplexity across texts would hide
	// every difference between policies.
	metric, label := MainMetric(tr.Task), MainMetric(tr.Task)
	if tr.Task == TaskLM {
		metric, label = "ppl_increase", "perplexity increase over the baseline (paired 95% CI)"
	} else {
		label += " (95% CI)"
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: %s (%s)", tr.Task, MainMetric(tr.Task), runtime)
	p.X.Label.Text = "keep ratio"
	p.Y.Label.Text = label
	// The empty corner: perplexity falls as keep grows (top right is free),
	// accuracies rise (bottom right is free).
	p.Legend.Top = tr.Task == TaskLM
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.X.Min, p.X.Max = 0, 1
	p.Add(plotter.NewGrid())
	type key struct{ policy, gran string }
	var keys []key
	for _, r := range tr.Rows {
		if !r.Baseline && r.Status == StatusOK && !slices.Contains(keys, key{r.Label(), r.Granularity}) {
			keys = append(keys, key{r.Label(), r.Granularity})
		}
	}
	if len(keys) == 0 {
		return nil, nil
	}
	policies := []string{}
	for _, k := range keys {
		if !slices.Contains(policies, k.policy) {
			policies = append(policies, k.policy)
		}
	}
	xmin, xmax := 1.0, 0.0
	for _, k := range keys {
		var (
			pts  plotter.XYs
			errs errPoints
		)
		for _, r := range tr.Rows {
			if r.Baseline || r.Label() != k.policy || r.Granularity != k.gran || r.Status != StatusOK {
				continue
			}
			v := float64(r.Metrics[metric])
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			pts = append(pts, plotter.XY{X: r.Keep, Y: v})
			xmin, xmax = min(xmin, r.Keep), max(xmax, r.Keep)
			if iv, ok := r.CI[metric]; ok && iv.Valid() {
				errs.add(r.Keep, v, iv)
			}
		}
		if len(pts) == 0 {
			continue
		}
		slices.SortFunc(pts, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
		line, points, err := plotter.NewLinePoints(pts)
		if err != nil {
			return nil, err
		}
		ci := slices.Index(policies, k.policy)
		line.Color, points.Color = plotutil.Color(ci), plotutil.Color(ci)
		points.Shape = plotutil.Shape(ci)
		line.Width = vg.Points(1.5)
		if k.gran == "per-token" {
			line.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
		}
		p.Add(line, points)
		if err := addErrorBars(p, errs, ci); err != nil {
			return nil, err
		}
		p.Legend.Add(k.policy+" "+k.gran, line, points)
	}
	if b := tr.BaselineRow(); b != nil && b.Status == StatusOK && xmax >= xmin {
		v := float64(b.Metrics[metric])
		if !math.IsNaN(v) && !math.IsInf(v, 0) {
			bl, err := plotter.NewLine(plotter.XYs{{X: xmin, Y: v}, {X: xmax, Y: v}})
			if err != nil {
				return nil, err
			}
			bl.Color = color.Gray{Y: 110}
			bl.Dashes = []vg.Length{vg.Points(1), vg.Points(2)}
			p.Add(bl)
			p.Legend.Add("baseline", bl)
		}
	}
	return p, nil
}

// errPoints are points with asymmetric error bars (a bootstrap interval).
type errPoints struct {
	plotter.XYs
	plotter.YErrors
}

func (e *errPoints) add(x, y float64, iv Interval) {
	e.XYs = append(e.XYs, plotter.XY{X: x, Y: y})
	e.YErrors = append(e.YErrors, struct{ Low, High float64 }{max(0, y-float64(iv.Lo)), max(0, float64(iv.Hi)-y)})
}

// attentionPlot draws ρ per layer for the decoding-phase and the
// prompt-internal measures, with their intervals and the per-head values.
func attentionPlot(runtime string, a *AttentionResult) (*plot.Plot, error) {
	if a == nil || len(a.Layers) == 0 {
		return nil, nil
	}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("key norm vs attention received (%s)", runtime)
	p.X.Label.Text = "layer"
	p.Y.Label.Text = "Spearman ρ(key norm, attention received)"
	p.Y.Min, p.Y.Max = -1, 1
	p.Add(plotter.NewGrid())
	for i, m := range []struct {
		name   string
		layers []LayerAttention
	}{{"decoding phase (queries after the prefill)", a.Layers}, {"prompt-internal (later prompt queries)", a.Prompt}} {
		var (
			mean  plotter.XYs
			heads plotter.XYs
			errs  errPoints
		)
		for _, l := range m.layers {
			x := float64(l.Layer) + 0.08*float64(2*i-1)
			if v := float64(l.Spearman); !math.IsNaN(v) {
				mean = append(mean, plotter.XY{X: x, Y: v})
				if l.SpearmanCI.Valid() {
					errs.add(x, v, l.SpearmanCI)
				}
			}
			for _, h := range l.HeadSpearman {
				if v := float64(h); !math.IsNaN(v) {
					heads = append(heads, plotter.XY{X: x, Y: v})
				}
			}
		}
		if len(heads) > 0 {
			sc, err := plotter.NewScatter(heads)
			if err != nil {
				return nil, err
			}
			sc.Color = plotutil.Color(i)
			sc.Shape = draw.CircleGlyph{}
			sc.Radius = vg.Points(1.5)
			p.Add(sc)
		}
		if len(mean) > 0 {
			line, points, err := plotter.NewLinePoints(mean)
			if err != nil {
				return nil, err
			}
			line.Color, points.Color = plotutil.Color(i), plotutil.Color(i)
			line.Width = vg.Points(2)
			if i == 1 {
				line.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
			}
			p.Add(line, points)
			p.Legend.Add(m.name+": mean, 95% CI", line, points)
		}
		if err := addErrorBars(p, errs, i); err != nil {
			return nil, err
		}
	}
	zero, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 0}, {X: float64(len(a.Layers) - 1), Y: 0}})
	if err != nil {
		return nil, err
	}
	zero.Color = color.Gray{Y: 110}
	p.Add(zero)
	p.Legend.TextStyle.Font.Size = vg.Points(8)
	p.Legend.Top, p.Legend.Left = true, true
	p.NominalX(layerNames(len(a.Layers))...)
	return p, nil
}

// rhoGrid is the layer × KV head grid of the decoding-phase ρ.
type rhoGrid struct{ layers []LayerAttention }

func (g rhoGrid) Dims() (c, r int)   { return len(g.layers[0].HeadSpearman), len(g.layers) }
func (g rhoGrid) Z(c, r int) float64 { return float64(g.layers[r].HeadSpearman[c]) }
func (g rhoGrid) X(c int) float64    { return float64(c) }
func (g rhoGrid) Y(r int) float64    { return float64(r) }

// attentionHeatmap draws the decoding-phase ρ per layer × KV head, blue
// negative (low-norm keys receive more), red positive, values written in the
// cells.
func attentionHeatmap(runtime string, a *AttentionResult) (*plot.Plot, error) {
	if a == nil || len(a.Layers) == 0 || len(a.Layers[0].HeadSpearman) == 0 {
		return nil, nil
	}
	g := rhoGrid{a.Layers}
	cm := moreland.SmoothBlueRed()
	cm.SetMin(-1)
	cm.SetMax(1)
	hm := plotter.NewHeatMap(g, cm.Palette(101))
	hm.Min, hm.Max = -1, 1
	hm.NaN = color.Gray{Y: 200}
	p := plot.New()
	p.Title.Text = fmt.Sprintf("ρ(key norm, attention) while decoding (%s)", runtime)
	p.X.Label.Text = "KV head"
	p.Y.Label.Text = "layer"
	p.Add(hm)
	var lab plotter.XYLabels
	c, r := g.Dims()
	for y := range r {
		for x := range c {
			lab.XYs = append(lab.XYs, plotter.XY{X: float64(x), Y: float64(y)})
			lab.Labels = append(lab.Labels, fmtNums([]Num{Num(g.Z(x, y))}))
		}
	}
	labels, err := plotter.NewLabels(lab)
	if err != nil {
		return nil, err
	}
	for i := range labels.TextStyle {
		labels.TextStyle[i].XAlign, labels.TextStyle[i].YAlign = draw.XCenter, draw.YCenter
	}
	p.Add(labels)
	p.NominalX(layerNames(c)...)
	p.NominalY(layerNames(r)...)
	return p, nil
}

func layerNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprint(i)
	}
	return out
}

// addErrorBars adds the intervals errs (none: nothing) to p in palette
// colour ci.
func addErrorBars(p *plot.Plot, errs errPoints, ci int) error {
	if len(errs.XYs) == 0 {
		return nil
	}
	eb, err := plotter.NewYErrorBars(errs)
	if err != nil {
		return err
	}
	eb.Color = plotutil.Color(ci)
	eb.CapWidth = vg.Points(4)
	p.Add(eb)
	return nil
}
