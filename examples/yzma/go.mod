module github.com/kvnorm/kvnorm/examples/yzma

go 1.26.0

require (
	github.com/hybridgroup/yzma v1.32.0
	github.com/kvnorm/kvnorm v0.0.0
)

require (
	github.com/ebitengine/purego v0.11.3 // indirect
	github.com/jupiterrider/ffi v0.8.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
)

replace github.com/kvnorm/kvnorm => ../..
