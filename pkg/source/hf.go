package source

import (
	"context"
	"fmt"
)

// resolveHF is where the hf:// source resolves a model. Not built yet.
func (r *Sources) resolveHF(ctx context.Context, u URI, secrets map[string]string) (Remote, error) {
	return nil, fmt.Errorf("%w: hf:// models are not supported yet", ErrInvalid)
}
