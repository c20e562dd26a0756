package llamacpp

import (
	"bytes"
	"go/ast"
	"go/build/constraint"
	"go/parser"
	"go/printer"
	"go/token"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNoCgoAPIMatches keeps nocgo.go in step with the cgo build: every
// exported function and method of the cgo files exists in nocgo.go with the
// same signature, and nocgo.go declares nothing else.
func TestNoCgoAPIMatches(t *testing.T) {
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	fset := token.NewFileSet()
	withCgo, without := map[string]string{}, map[string]string{}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		src, err := os.ReadFile(name)
		require.NoError(t, err)
		f, err := parser.ParseFile(fset, name, src, parser.ParseComments)
		require.NoError(t, err)
		tag := ""
		for _, cg := range f.Comments {
			for _, c := range cg.List {
				if constraint.IsGoBuild(c.Text) {
					tag = strings.TrimSpace(strings.TrimPrefix(c.Text, "//go:build"))
				}
			}
		}
		var into map[string]string
		switch tag {
		case "cgo":
			into = withCgo
		case "!cgo":
			into = without
		default:
			continue
		}
		for _, d := range f.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || !fd.Name.IsExported() {
				continue
			}
			key := fd.Name.Name
			if fd.Recv != nil {
				recv := typeString(fset, fd.Recv.List[0].Type)
				if !ast.IsExported(strings.TrimPrefix(recv, "*")) {
					continue
				}
				key = recv + "." + key
			}
			into[key] = sigString(fset, fd.Type)
		}
	}
	require.NotEmpty(t, withCgo)
	assert.Equal(t, withCgo, without)
}

func typeString(fset *token.FileSet, e ast.Expr) string {
	var b bytes.Buffer
	printer.Fprint(&b, fset, e)
	return b.String()
}

// sigString prints a signature's parameter and result types, without names.
func sigString(fset *token.FileSet, ft *ast.FuncType) string {
	list := func(fl *ast.FieldList) string {
		if fl == nil {
			return ""
		}
		var parts []string
		for _, f := range fl.List {
			n := max(1, len(f.Names))
			for range n {
				parts = append(parts, typeString(fset, f.Type))
			}
		}
		return strings.Join(parts, ", ")
	}
	return "(" + list(ft.Params) + ") (" + list(ft.Results) + ")"
}
