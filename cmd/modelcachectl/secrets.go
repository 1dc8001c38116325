package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"sigs.k8s.io/yaml"
)

// readSecretFile reads the credentials of a prefetch from name ("-" is
// stdin): a Kubernetes Secret manifest (YAML or JSON; data and/or
// stringData) or an env file of KEY=VALUE lines. Error messages name keys
// and lines, never values.
func readSecretFile(name string, stdin io.Reader) (map[string]string, error) {
	var raw []byte
	var err error
	if name == "-" {
		raw, err = io.ReadAll(stdin)
	} else {
		raw, err = os.ReadFile(name)
	}
	if err != nil {
		return nil, fmt.Errorf("reading the secret file: %w", err)
	}
	var secrets map[string]string
	if looksLikeEnvFile(raw) {
		secrets, err = parseEnvFile(raw)
	} else {
		secrets, err = parseSecretManifest(raw)
	}
	if err != nil {
		return nil, fmt.Errorf("secret file %s: %w", name, err)
	}
	if len(secrets) == 0 {
		return nil, fmt.Errorf("secret file %s holds no keys", name)
	}
	return secrets, nil
}

var envLine = regexp.MustCompile(`^(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=(.*)$`)

// looksLikeEnvFile reports whether the first line that is not blank or a
// comment is KEY=VALUE; a manifest's first line is "key:", "---" or "{".
func looksLikeEnvFile(raw []byte) bool {
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		return envLine.MatchString(line)
	}
	return false
}

// parseEnvFile parses KEY=VALUE lines, as in a Docker or systemd env file.
// Blank lines and lines starting with # are skipped, "export " is allowed,
// and a value wrapped in matching single or double quotes loses them
// (nothing else is unescaped). Later lines override earlier ones.
func parseEnvFile(raw []byte) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		m := envLine.FindStringSubmatch(line)
		if m == nil {
			// Do not quote the line: it may hold a secret.
			return nil, fmt.Errorf("line %d: expected KEY=VALUE", n)
		}
		out[m[1]] = unquote(strings.TrimSpace(m[2]))
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

func unquote(v string) string {
	if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
		return v[1 : len(v)-1]
	}
	return v
}

// secretManifest is the part of a Kubernetes Secret a prefetch uses.
type secretManifest struct {
	APIVersion string         `json:"apiVersion"`
	Kind       string         `json:"kind"`
	Data       map[string]any `json:"data"`
	StringData map[string]any `json:"stringData"`
}

// parseSecretManifest parses a Secret in YAML or JSON: data values are
// base64, stringData values are plain and win over data, as in the API
// server.
func parseSecretManifest(raw []byte) (map[string]string, error) {
	var s secretManifest
	if err := yaml.Unmarshal(raw, &s); err != nil {
		return nil, fmt.Errorf("neither a Kubernetes Secret manifest (YAML or JSON) nor an env file of KEY=VALUE lines: %w", redactYAMLError(err))
	}
	if s.Kind != "" && s.Kind != "Secret" {
		return nil, fmt.Errorf("is a %s, not a Secret", s.Kind)
	}
	if s.Data == nil && s.StringData == nil {
		return nil, errors.New("is not a Kubernetes Secret manifest (no data or stringData) nor an env file of KEY=VALUE lines")
	}
	out := map[string]string{}
	for k, v := range s.Data {
		str, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("data.%s is not a base64 string", k)
		}
		b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(str))
		if err != nil {
			return nil, fmt.Errorf("data.%s is not valid base64 (put plain values under stringData)", k)
		}
		out[k] = string(b)
	}
	for k, v := range s.StringData {
		str, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("stringData.%s is not a string (quote it)", k)
		}
		out[k] = str
	}
	return out, nil
}

// redactYAMLError keeps a parse error's position and drops what it quotes
// of the input, which may be a secret.
func redactYAMLError(err error) error {
	msg := err.Error()
	var syn *json.SyntaxError
	if errors.As(err, &syn) {
		return fmt.Errorf("invalid JSON at byte %d", syn.Offset)
	}
	if i := strings.Index(msg, "line "); i >= 0 {
		line := msg[i:]
		if j := strings.IndexByte(line, ':'); j >= 0 {
			line = line[:j]
		}
		return fmt.Errorf("invalid YAML at %s", line)
	}
	return errors.New("invalid YAML")
}
