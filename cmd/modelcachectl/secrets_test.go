package main

import (
	"encoding/base64"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseSecretFile(t *testing.T) {
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	cases := []struct {
		name    string
		content string
		want    map[string]string
		wantErr string // substring of the error; "" means success
	}{
		{
			name: "env file",
			content: "# comment\n\nA=1\nexport B = two words \nC=\"quoted # not a comment\"\nD='single'\nE=\nF=a=b\nA=overridden\n" +
				"  # indented comment\nG=\"unbalanced\n",
			want: map[string]string{"A": "overridden", "B": "two words", "C": "quoted # not a comment", "D": "single", "E": "", "F": "a=b", "G": "\"unbalanced"},
		},
		{
			name:    "env file with CRLF",
			content: "AWS_ACCESS_KEY_ID=id\r\nAWS_SECRET_ACCESS_KEY=key\r\n",
			want:    map[string]string{"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
		},
		{
			name:    "env file with a bad line names the line, not its content",
			content: "A=1\nthis-is-the-s3cr3t\n",
			wantErr: "line 2: expected KEY=VALUE",
		},
		{
			name: "YAML Secret, stringData wins over data",
			content: "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  A: " + b64("from data") + "\n  B: " + b64("b\nmultiline") +
				"\nstringData:\n  A: from stringData\n  C: \"9000\"\n",
			want: map[string]string{"A": "from stringData", "B": "b\nmultiline", "C": "9000"},
		},
		{
			name:    "YAML Secret after a document marker",
			content: "---\n# from kubectl\napiVersion: v1\nkind: Secret\nstringData:\n  GOOGLE_APPLICATION_CREDENTIALS: |\n    {\"type\": \"service_account\"}\n",
			want:    map[string]string{"GOOGLE_APPLICATION_CREDENTIALS": "{\"type\": \"service_account\"}\n"},
		},
		{
			name:    "JSON Secret",
			content: `{"apiVersion":"v1","kind":"Secret","data":{"K":"` + b64("v") + `"}}`,
			want:    map[string]string{"K": "v"},
		},
		{
			name:    "bad base64 names the key, not the value",
			content: "kind: Secret\ndata:\n  K: not*base64*s3cr3t\n",
			wantErr: "data.K is not valid base64",
		},
		{
			name:    "unquoted number in stringData",
			content: "kind: Secret\nstringData:\n  PORT: 9000\n",
			wantErr: "stringData.PORT is not a string (quote it)",
		},
		{
			name:    "a ConfigMap",
			content: "apiVersion: v1\nkind: ConfigMap\ndata:\n  K: v\n",
			wantErr: "is a ConfigMap, not a Secret",
		},
		{
			name:    "YAML that is no Secret",
			content: "foo: bar\n",
			wantErr: "is not a Kubernetes Secret manifest",
		},
		{
			name:    "broken YAML does not quote the input",
			content: "kind: Secret\nstringData:\n  K: [s3cr3t\n",
			wantErr: "invalid YAML",
		},
		{
			name:    "empty",
			content: "# nothing\n",
			wantErr: "",
		},
		{
			name:    "empty Secret",
			content: "kind: Secret\ndata: {}\n",
			wantErr: "holds no keys",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := readSecretFile(path, nil)
			if tc.name == "empty" {
				// Neither format: the manifest parser reports it.
				if err == nil {
					t.Fatalf("got %v, want an error", got)
				}
				return
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "s3cr3t") {
					t.Errorf("the error quotes a value: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tc.want) {
				t.Errorf("got %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestReadSecretFileFromStdin(t *testing.T) {
	got, err := readSecretFile("-", strings.NewReader("K=v\n"))
	if err != nil || !maps.Equal(got, map[string]string{"K": "v"}) {
		t.Fatalf("got %v, %v", got, err)
	}
}
