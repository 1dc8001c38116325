{{/*
kubelet's root directory without a trailing slash; must be absolute.
*/}}
{{- define "modelcache.kubeletDir" -}}
{{- $d := trimSuffix "/" (required "kubeletDir is required" .Values.kubeletDir) -}}
{{- if not (isAbs $d) -}}
{{- fail (printf "kubeletDir must be an absolute path, got %q" .Values.kubeletDir) -}}
{{- end -}}
{{- $d -}}
{{- end -}}

{{/*
Host directory of the node's cache; must be absolute.
*/}}
{{- define "modelcache.cacheDir" -}}
{{- $d := trimSuffix "/" (required "cache.dir is required" .Values.cache.dir) -}}
{{- if not (isAbs $d) -}}
{{- fail (printf "cache.dir must be an absolute path, got %q" .Values.cache.dir) -}}
{{- end -}}
{{- $d -}}
{{- end -}}

{{/*
Directory holding the plugin's socket on the host.
*/}}
{{- define "modelcache.pluginDir" -}}
{{- include "modelcache.kubeletDir" . }}/plugins/modelcache.csi.dev
{{- end -}}

{{/*
The modelcache-csi image reference.
*/}}
{{- define "modelcache.image" -}}
{{- printf "%s:%s" (required "image.repository is required" .Values.image.repository) (toString (required "image.tag is required" .Values.image.tag)) -}}
{{- end -}}
