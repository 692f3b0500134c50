// Build of the admin console. The gateway embeds the output and serves it at `/` on the admin
// listener, so the base is `/` and assets land under `/assets/` (Vite's defaults). `npm run dev`
// serves the sources and forwards the API paths to a running gateway (ISTHMUS_ADMIN_URL).
import { defineConfig } from 'vite';

const admin = process.env['ISTHMUS_ADMIN_URL'] ?? 'http://127.0.0.1:9090';

export default defineConfig({
  base: '/',
  build: {
    target: 'es2022',
    sourcemap: false,
    // The console is one small page; a single chunk keeps the embedded file list short.
    chunkSizeWarningLimit: 200,
  },
  server: {
    proxy: {
      '/readyz': admin,
      '/metrics': admin,
      '/admin/': admin,
    },
  },
});
