package main

import (
	"strings"
	"testing"
)

const oldReport = `# Benchmarks

Generated on an old day.

## Machine

| CPU | old |

## Goals

| section | goal | measured | |
|---|---|---|---|
| 1 | cold | 0.7 | met |
| 7 | remote | 0.6 | met |
| 8 | scrape | 900 ms | **not met** |

## 1. Cold

old cold

## 7. Remote

old remote

## 8. Scale

old scale

## Method

- old method
`

const freshReport = `# Benchmarks

Generated on a new day.

## Machine

| CPU | new |

## Goals

| section | goal | measured | |
|---|---|---|---|
| 8 | scrape | 1 ms | met |
| 8 | evict | 2 ms | met |

## 8. Scale

new scale

## Method

- new method
`

func TestMergeReport(t *testing.T) {
	tests := []struct {
		name, old, fresh string
		want             string // "" with wantErr
		wantErr          bool
	}{
		{name: "replaces the section and its goals, keeps the rest", old: oldReport, fresh: freshReport,
			want: strings.NewReplacer(
				"| 8 | scrape | 900 ms | **not met** |\n", "| 8 | scrape | 1 ms | met |\n| 8 | evict | 2 ms | met |\n",
				"## 8. Scale\n\nold scale\n", "## 8. Scale\n\nNOTE\n\nnew scale\n").Replace(oldReport)},
		{name: "adds a section the old report lacks, in number order", old: strings.Replace(oldReport, "## 8. Scale\n\nold scale\n\n", "", 1),
			fresh: freshReport,
			want: strings.NewReplacer(
				"| 8 | scrape | 900 ms | **not met** |\n", "| 8 | scrape | 1 ms | met |\n| 8 | evict | 2 ms | met |\n",
				"## 8. Scale\n\nold scale\n", "## 8. Scale\n\nNOTE\n\nnew scale\n").Replace(oldReport)},
		{name: "goal rows in section order", old: strings.Replace(oldReport, "| 8 | scrape | 900 ms | **not met** |\n", "", 1),
			fresh: strings.Replace(freshReport, "8", "5", -1),
			want: strings.NewReplacer(
				"| 7 | remote", "| 5 | scrape | 1 ms | met |\n| 5 | evict | 2 ms | met |\n| 7 | remote",
				"## 7. Remote", "## 5. Scale\n\nNOTE\n\nnew scale\n\n## 7. Remote").Replace(strings.Replace(oldReport, "| 8 | scrape | 900 ms | **not met** |\n", "", 1))},
		{name: "an old table with no rows", old: "## Goals\n\n| section | goal |\n|---|---|\n\n## Method\n", fresh: freshReport,
			want: "## Goals\n\n| section | goal |\n|---|---|\n| 8 | scrape | 1 ms | met |\n| 8 | evict | 2 ms | met |\n\n## 8. Scale\n\nNOTE\n\nnew scale\n\n## Method\n"},
		{name: "fresh has no numbered section", old: oldReport, fresh: "## Goals\n\n## Method\n", wantErr: true},
		{name: "old has no goals", old: "## 8. Scale\n\nold\n", fresh: freshReport, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mergeReport(tt.old, tt.fresh, "NOTE")
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("mergeReport = (error %v)\n%s\nwant (error %v)\n%s", err, got, tt.wantErr, tt.want)
			}
		})
	}
}
