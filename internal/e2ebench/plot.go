package e2ebench

import (
	"cmp"
	"fmt"
	"image/color"
	"os"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// PlotRows draws, for one runtime's rows, KV bytes in use and decode
// tokens/s against the context (prompt tokens), one line per keep ratio,
// side by side in one PNG.
func PlotRows(path, title string, rows []*Row) error {
	var keeps []float64
	var ctxs []int
	for _, r := range rows {
		if !slices.Contains(keeps, r.Keep) {
			keeps = append(keeps, r.Keep)
		}
		if !slices.Contains(ctxs, r.PromptTokens) {
			ctxs = append(ctxs, r.PromptTokens)
		}
	}
	slices.Sort(ctxs)
	slices.SortFunc(keeps, func(a, b float64) int { return cmp.Compare(b, a) })
	ticks := make([]plot.Tick, len(ctxs))
	for i, c := range ctxs {
		ticks[i] = plot.Tick{Value: float64(c), Label: fmt.Sprint(c)}
	}
	panel := func(ylabel string, y func(*Row) float64) (*plot.Plot, error) {
		p := plot.New()
		p.Title.Text = title
		p.X.Label.Text = "context (prompt tokens)"
		p.Y.Label.Text = ylabel
		p.X.Tick.Marker = plot.ConstantTicks(ticks)
		p.Y.Min = 0
		for _, r := range rows {
			p.Y.Max = max(p.Y.Max, 1.3*y(r)) // room for the legend
		}
		p.Add(plotter.NewGrid())
		p.Legend.Top, p.Legend.Left = true, true
		p.Legend.XOffs, p.Legend.YOffs = vg.Millimeter*2, -vg.Millimeter*2
		p.Legend.TextStyle.Font.Size = vg.Points(9)
		for i, k := range keeps {
			var pts plotter.XYs
			for _, r := range rows {
				if r.Keep == k {
					pts = append(pts, plotter.XY{X: float64(r.PromptTokens), Y: y(r)})
				}
			}
			slices.SortFunc(pts, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
			l, pt, err := plotter.NewLinePoints(pts)
			if err != nil {
				return nil, err
			}
			l.Color, pt.Color, pt.Shape = plotutil.Color(i), plotutil.Color(i), plotutil.Shape(i)
			l.Width = vg.Points(1.5)
			p.Add(l, pt)
			p.Legend.Add(fmt.Sprintf("keep %g", k), l, pt)
		}
		return p, nil
	}
	a, err := panel("KV bytes in use (MiB)", func(r *Row) float64 { return mib(r.KVBytes) })
	if err != nil {
		return err
	}
	b, err := panel("decode tokens/s", func(r *Row) float64 { return r.DecodeTokensPerS })
	if err != nil {
		return err
	}
	return savePanels(path, a, b)
}

// PlotChunked draws the RSS curve of a chunked run: RSS, peak RSS and
// anonymous RSS after every chunk against the tokens fed, with the
// uncompressed baseline's peak as a dashed line when measured.
func PlotChunked(path string, c *Chunked) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("%s: %d tokens through %d cells (keep %g)", c.Runtime, c.PromptTokens, c.Ctx, c.Keep)
	p.X.Label.Text = "prompt tokens fed"
	p.Y.Label.Text = "MiB"
	p.Y.Min = 0
	top := c.PeakRSSBytes
	if c.Baseline != nil {
		top = max(top, c.Baseline.PeakRSSBytes)
	}
	p.Y.Max = 1.4 * mib(top) // room for the legend
	p.Add(plotter.NewGrid())
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.XOffs, p.Legend.YOffs = vg.Millimeter*2, -vg.Millimeter*2
	p.Legend.TextStyle.Font.Size = vg.Points(9)
	series := []struct {
		name string
		v    func(Mem) int64
	}{
		{"peak RSS (VmHWM)", func(m Mem) int64 { return m.HWM }},
		{"RSS", func(m Mem) int64 { return m.RSS }},
		{"anonymous RSS", func(m Mem) int64 { return m.Anon }},
	}
	for i, s := range series {
		pts := plotter.XYs{{X: 0, Y: mib(s.v(c.Before))}}
		for _, sm := range c.Samples {
			pts = append(pts, plotter.XY{X: float64(sm.TokensFed), Y: mib(s.v(sm.Mem))})
		}
		l, pt, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		l.Color, pt.Color, pt.Shape = plotutil.Color(i), plotutil.Color(i), plotutil.Shape(i)
		p.Add(l, pt)
		p.Legend.Add(s.name, l, pt)
	}
	if b := c.Baseline; b != nil {
		for i, s := range []struct {
			name string
			v    int64
		}{
			{fmt.Sprintf("uncompressed, %d cells: peak RSS", b.Ctx), b.PeakRSSBytes},
			{fmt.Sprintf("uncompressed, %d cells: anonymous RSS", b.Ctx), b.End.Anon},
		} {
			l, err := plotter.NewLine(plotter.XYs{{X: 0, Y: mib(s.v)}, {X: float64(c.PromptTokens), Y: mib(s.v)}})
			if err != nil {
				return err
			}
			l.Color = color.Gray{Y: uint8(60 + 60*i)}
			l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
			p.Add(l)
			p.Legend.Add(s.name, l)
		}
	}
	return p.Save(16*vg.Centimeter, 11*vg.Centimeter, path)
}

func savePanels(path string, ps ...*plot.Plot) error {
	w, h := vg.Length(len(ps))*14*vg.Centimeter, 11*vg.Centimeter
	img := vgimg.New(w, h)
	dc := draw.New(img)
	t := draw.Tiles{Rows: 1, Cols: len(ps), PadX: vg.Centimeter, PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}
	cs := plot.Align([][]*plot.Plot{ps}, t, dc)
	for i, p := range ps {
		p.Draw(cs[0][i])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
