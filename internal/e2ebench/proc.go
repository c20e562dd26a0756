package e2ebench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Mem is what /proc/self/status says about this process's memory, in bytes.
type Mem struct {
	RSS  int64 `json:"rss_bytes"`      // VmRSS
	HWM  int64 `json:"hwm_bytes"`      // VmHWM: the peak RSS of the process so far
	Anon int64 `json:"rss_anon_bytes"` // RssAnon: heap, the KV cache, compute buffers
	File int64 `json:"rss_file_bytes"` // RssFile: the mmapped model, the binary
}

// ReadMem reads /proc/self/status. Without /proc it returns zeros and an
// error.
func ReadMem() (Mem, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return Mem{}, err
	}
	return parseStatus(b)
}

func parseStatus(b []byte) (Mem, error) {
	var m Mem
	fields := map[string]*int64{"VmRSS:": &m.RSS, "VmHWM:": &m.HWM, "RssAnon:": &m.Anon, "RssFile:": &m.File}
	sc := bufio.NewScanner(bytes.NewReader(b))
	found := 0
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		dst, ok := fields[f[0]]
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return m, fmt.Errorf("e2ebench: /proc/self/status: %s %q: %w", f[0], f[1], err)
		}
		if len(f) > 2 && f[2] == "kB" {
			n *= 1024
		}
		*dst = n
		found++
	}
	if found < 2 {
		return m, fmt.Errorf("e2ebench: /proc/self/status has no VmRSS/VmHWM")
	}
	return m, nil
}

// LoadAvg returns the 1-minute load average (0 when unknown).
func LoadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
