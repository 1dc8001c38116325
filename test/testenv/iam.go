package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"

	"github.com/minio/madmin-go/v3"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// adminClient is a MinIO admin client for endpoint (an http:// URL) with the
// suite's root credentials.
func adminClient(endpoint string) (*madmin.AdminClient, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, err
	}
	if u.Scheme != "http" || u.Host == "" {
		return nil, fmt.Errorf("MinIO endpoint %q: want http://host:port", endpoint)
	}
	return madmin.NewWithOptions(u.Host, &madmin.Options{Creds: credentials.NewStaticV4(AccessKey, SecretKey, ""), Secure: false})
}

// AddUser creates (or resets) the MinIO user user with secret, stores
// policyJSON as a canned policy named after the user and attaches it, so the
// user can do exactly what the policy allows.
func AddUser(ctx context.Context, endpoint, user, secret, policyJSON string) error {
	adm, err := adminClient(endpoint)
	if err != nil {
		return err
	}
	if err := adm.AddUser(ctx, user, secret); err != nil {
		return fmt.Errorf("adding MinIO user %s: %w", user, err)
	}
	if err := SetUserPolicy(ctx, endpoint, user, policyJSON); err != nil {
		return err
	}
	_, err = adm.AttachPolicy(ctx, madmin.PolicyAssociationReq{Policies: []string{user}, User: user})
	if err != nil && !alreadyAttached(err) {
		return fmt.Errorf("attaching policy %s to MinIO user %s: %w", user, user, err)
	}
	return nil
}

// SetUserPolicy replaces the canned policy a user made by AddUser holds:
// the way to grant or revoke access to a user that already exists. MinIO
// applies it to the user's next request.
func SetUserPolicy(ctx context.Context, endpoint, user, policyJSON string) error {
	adm, err := adminClient(endpoint)
	if err != nil {
		return err
	}
	if err := adm.AddCannedPolicy(ctx, user, []byte(policyJSON)); err != nil {
		return fmt.Errorf("storing policy %s: %w", user, err)
	}
	return nil
}

// RemoveUser deletes a user made by AddUser and its policy.
func RemoveUser(ctx context.Context, endpoint, user string) error {
	adm, err := adminClient(endpoint)
	if err != nil {
		return err
	}
	if err := adm.RemoveUser(ctx, user); err != nil {
		return fmt.Errorf("removing MinIO user %s: %w", user, err)
	}
	if err := adm.RemoveCannedPolicy(ctx, user); err != nil {
		return fmt.Errorf("removing policy %s: %w", user, err)
	}
	return nil
}

func alreadyAttached(err error) bool {
	resp := madmin.ToErrorResponse(err)
	return resp.Code == "XMinioAdminPolicyChangeAlreadyApplied" || strings.Contains(err.Error(), "already")
}

type statement struct {
	Effect    string         `json:"Effect"`
	Action    []string       `json:"Action"`
	Resource  []string       `json:"Resource"`
	Condition map[string]any `json:"Condition,omitempty"`
}

func policy(st ...statement) string {
	b, err := json.Marshal(map[string]any{"Version": "2012-10-17", "Statement": st})
	if err != nil {
		panic(err) // static shapes only
	}
	return string(b)
}

// listStatement allows listing bucket, restricted to prefix ("" for the
// whole bucket).
func listStatement(bucket, prefix string) statement {
	s := statement{Effect: "Allow", Action: []string{"s3:ListBucket"}, Resource: []string{"arn:aws:s3:::" + bucket}}
	if prefix = strings.Trim(prefix, "/"); prefix != "" {
		s.Condition = map[string]any{"StringLike": map[string][]string{"s3:prefix": {prefix, prefix + "/*"}}}
	}
	return s
}

func objectResource(bucket, prefix string) string {
	if prefix = strings.Trim(prefix, "/"); prefix != "" {
		return "arn:aws:s3:::" + bucket + "/" + prefix + "/*"
	}
	return "arn:aws:s3:::" + bucket + "/*"
}

// ReadOnlyPolicy allows listing and reading the objects of bucket under
// prefix ("" for the whole bucket): s3:ListBucket and s3:GetObject.
func ReadOnlyPolicy(bucket, prefix string) string {
	return policy(listStatement(bucket, prefix),
		statement{Effect: "Allow", Action: []string{"s3:GetObject"}, Resource: []string{objectResource(bucket, prefix)}})
}

// ListOnlyPolicy allows listing bucket under prefix but not reading (or
// stat-ing) any object: s3:ListBucket without s3:GetObject.
func ListOnlyPolicy(bucket, prefix string) string {
	return policy(listStatement(bucket, prefix))
}

// NoAccessPolicy allows nothing: a policy needs a statement, so it denies
// every S3 action explicitly.
func NoAccessPolicy() string {
	return policy(statement{Effect: "Deny", Action: []string{"s3:*"}, Resource: []string{"arn:aws:s3:::*"}})
}
