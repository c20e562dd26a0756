package conformance

import (
	"cmp"
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
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
				p, err = attentionPlot(rr.Runtime, tr.Attention)
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
	metric := MainMetric(tr.Task)
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: %s (%s)", tr.Task, metric, runtime)
	p.X.Label.Text = "keep ratio"
	p.Y.Label.Text = metric
	// The empty corner: perplexity falls as keep grows (top right is free),
	// accuracies rise (bottom right is free).
	p.Legend.Top = tr.Task == TaskLM
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.X.Min, p.X.Max = 0, 1
	p.Add(plotter.NewGrid())
	type key struct{ policy, gran string }
	var keys []key
	for _, r := range tr.Rows {
		if !r.Baseline && r.Status == StatusOK && !slices.Contains(keys, key{r.Policy, r.Granularity}) {
			keys = append(keys, key{r.Policy, r.Granularity})
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
		var pts plotter.XYs
		for _, r := range tr.Rows {
			if r.Baseline || r.Policy != k.policy || r.Granularity != k.gran || r.Status != StatusOK {
				continue
			}
			v := float64(r.Metrics[metric])
			if math.IsNaN(v) || math.IsInf(v, 0) {
				continue
			}
			pts = append(pts, plotter.XY{X: r.Keep, Y: v})
			xmin, xmax = min(xmin, r.Keep), max(xmax, r.Keep)
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
	var mean, heads plotter.XYs
	for _, l := range a.Layers {
		if v := float64(l.Spearman); !math.IsNaN(v) {
			mean = append(mean, plotter.XY{X: float64(l.Layer), Y: v})
		}
		for _, h := range l.HeadSpearman {
			if v := float64(h); !math.IsNaN(v) {
				heads = append(heads, plotter.XY{X: float64(l.Layer), Y: v})
			}
		}
	}
	if len(heads) > 0 {
		sc, err := plotter.NewScatter(heads)
		if err != nil {
			return nil, err
		}
		sc.Color = plotutil.Color(1)
		sc.Shape = draw.CircleGlyph{}
		p.Add(sc)
		p.Legend.Add("per KV head", sc)
	}
	if len(mean) > 0 {
		line, points, err := plotter.NewLinePoints(mean)
		if err != nil {
			return nil, err
		}
		line.Color, points.Color = plotutil.Color(0), plotutil.Color(0)
		line.Width = vg.Points(2)
		p.Add(line, points)
		p.Legend.Add("mean over heads", line, points)
	}
	zero, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 0}, {X: float64(len(a.Layers) - 1), Y: 0}})
	if err != nil {
		return nil, err
	}
	zero.Color = color.Gray{Y: 110}
	p.Add(zero)
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	p.NominalX(layerNames(len(a.Layers))...)
	return p, nil
}

func layerNames(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprint(i)
	}
	return out
}
