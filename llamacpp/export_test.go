//go:build cgo

package llamacpp

// DropKeyCapture makes c's callback stop asking for the "Kcur-N" nodes, as on
// a graph kvnorm cannot read (no RoPE'd keys: ALiBi, MLA).
func DropKeyCapture(c *Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cbWant &^= 1 // KVN_KEYS
	c.cb.enabled &^= 1
}

// SetEagerKeys makes every observed decode read its keys (as before keys of
// short batches were held back) until the returned func restores it.
func SetEagerKeys(on bool) (restore func()) {
	old := eagerKeys
	eagerKeys = on
	return func() { eagerKeys = old }
}
