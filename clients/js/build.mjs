// The package's client is static/taskpush.js, the file pages load with a script tag: this
// copies it here (npm run build; npm pack runs it too). tests/test_js_package.py fails when
// the two differ, so there is one source and no drift.
import { copyFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, '..', '..', 'static', 'taskpush.js');
try {
  copyFileSync(source, join(here, 'taskpush.js'));
} catch (err) {
  // installed from a tarball: there is no checkout around it, and the copy is already here
  if (err.code !== 'ENOENT') throw err;
}
