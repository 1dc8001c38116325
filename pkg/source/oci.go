package source

import (
	"context"
	"fmt"
)

// resolveOCI is where the oci:// source resolves a model. Not built yet.
func (r *Sources) resolveOCI(ctx context.Context, u URI, secrets map[string]string) (Remote, error) {
	return nil, fmt.Errorf("%w: oci:// models are not supported yet", ErrInvalid)
}
