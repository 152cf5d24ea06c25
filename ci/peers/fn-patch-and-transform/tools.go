//go:build tools

// Keeps the built command in the module graph for go mod tidy.
package tools

import _ "github.com/crossplane-contrib/function-patch-and-transform"
