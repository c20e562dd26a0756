//go:build cgo

package llamacpp

// DropKeyCapture makes c's callback stop asking for the "Kcur-N" nodes, as on
// a graph kvnorm cannot read (no RoPE'd keys: ALiBi, MLA).
func DropKeyCapture(c *Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cb.enabled &^= 1 // KVN_KEYS
}
